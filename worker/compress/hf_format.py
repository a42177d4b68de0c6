"""Hugging Face model folders (format ``hf``): load, run, count, prune, fine-tune, quantize and convert them.

A model travels through the pipeline as an archive of its folder: the upload (a ``.zip`` or plain ``.tar``) and
every step's output (a ``.zip``, stored uncompressed, of the folder ``save_pretrained`` wrote plus the source
folder's tokenizer files). Archives are unpacked with the API's checked extraction (:mod:`app.inspection.archive`)
into the job's temporary folder, once per file.

Loading is ``AutoModelFor<task>.from_pretrained(folder, trust_remote_code=False, use_safetensors=True,
local_files_only=True)``, the Auto class chosen from the task the architecture names (``app.inspection.hf.TASKS``),
so the upload never names the class that is built, no code from the folder runs, and no pickle is read (pickled
weights beside the safetensors are deleted after extraction). The runner returns the logits (classifiers) or
``last_hidden_state`` (base models) in float32.

Counting rule (``count_parameters``): the model's parameters, tied ones once (``named_parameters``), buffers not
counted; an int8 torchao weight counts as its logical (dequantized) tensor, so quantizing leaves the count unchanged.
``size_bytes`` is the folder's bytes (weights, config and tokenizer files), whichever archive holds it.

Imported only through ``backend.get_backend("hf")``: it imports torch and transformers at import time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import shutil
import sys
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from app.errors import InvalidUpload
from app.inspection.archive import DEFAULT_MAX_RATIO, DEFAULT_MAX_TOTAL_BYTES, safe_extract_archive
from app.inspection.hf import (
    CODE_SUFFIXES,
    CONFIG,
    PICKLED_SUFFIXES,
    TEXT_INPUTS,
    WEIGHTS,
    WEIGHTS_INDEX,
    hf_root,
    task_of,
)
from app.jobs.spec import (
    ConvertOnnx,
    Finetune,
    PruneMagnitude,
    PruneWanda,
    QuantizeBf16,
    QuantizeFp16,
    QuantizeInt8Dynamic,
    QuantizeInt8WeightOnly,
    parse_pattern,
)
from worker.compress.pruning import magnitude_report, nm_mask, row_keep, step_masks
from worker.compress.types import CompressionError, EvalData, StepContext, StepReport, torch_errors
from worker.compress.weight_swap import ModuleWeightSwapper

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "feature-extraction": "AutoModel",
}
# Files of the source folder that travel with every output (tokenizer, generation and processor configs, docs).
_CARRIED_SUFFIXES = (".json", ".txt", ".model", ".md")
_WRITTEN_BY_SAVE = {CONFIG, WEIGHTS, WEIGHTS_INDEX}
MAX_TEXT_TOKENS = 512
_EXTRACTED_KEEP = 4
_BATCH = 32
_EXAMPLE_SEQUENCE = 16


# ----------------------------------------------------------------------------------------------------
# Folders


_extracted: OrderedDict[tuple[str, int, int], tuple[Path, Path]] = OrderedDict()  # key -> (temp dir, folder)


def model_folder(path: Path) -> Path:
    """The model folder inside the archive ``path`` (``.zip`` or plain ``.tar``), extracted once per file.

    The last few extractions are kept (a measurement opens the same file several times); older ones are deleted.
    """
    if path.is_dir():
        return path
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _extracted and _extracted[key][1].is_dir():
        _extracted.move_to_end(key)
        return _extracted[key][1]
    dest = Path(tempfile.mkdtemp(prefix="hf-"))
    try:
        # The API checked this archive against the deployment's limits (the sandbox does not see its settings); the
        # checks run again here, the total bounded by what the per-member ratio limit allows for this file.
        written = safe_extract_archive(
            path, dest, max_total_bytes=max(DEFAULT_MAX_TOTAL_BYTES, int(stat.st_size * DEFAULT_MAX_RATIO))
        )
    except InvalidUpload as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise CompressionError(exc.code, f"the model archive cannot be unpacked: {exc.message}", exc.details) from exc
    prefix = hf_root([p.relative_to(dest).as_posix() for p in written])
    if prefix is None:
        shutil.rmtree(dest, ignore_errors=True)
        raise CompressionError("invalid_model", "the archive holds no config.json with model.safetensors beside it")
    for p in written:  # never read (safetensors only, no remote code); removed so that nothing could read them
        if p.name.lower().endswith(PICKLED_SUFFIXES + CODE_SUFFIXES):
            p.unlink()
    folder = dest / prefix.rstrip("/") if prefix else dest
    _extracted[key] = (dest, folder)
    while len(_extracted) > _EXTRACTED_KEEP:
        _, (old, _) = _extracted.popitem(last=False)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    try:
        value = json.loads((folder / CONFIG).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise CompressionError("invalid_model", f"config.json cannot be read: {exc}"[:500]) from exc
    if not isinstance(value, dict):
        raise CompressionError("invalid_model", "config.json is not a JSON object")
    return value


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def save_folder(model: transformers.PreTrainedModel, source: Path, dst: Path) -> None:
    """``save_pretrained`` (safetensors) plus the source folder's tokenizer and other small files, zipped to ``dst``.

    The ZIP is stored, not deflated: its size is the folder's, and zeros from pruning stay as large as they are on
    disk once unpacked (the report says so rather than a compressor hiding it).
    """
    with tempfile.TemporaryDirectory(prefix="hf-save-") as tmp:
        out = Path(tmp) / "model"
        with torch_errors("save_failed", "save_pretrained"), contextlib.redirect_stdout(sys.stderr):
            model.save_pretrained(out, safe_serialization=True)
        for item in sorted(source.iterdir()):
            name = item.name
            if (
                item.is_file()
                and not item.is_symlink()
                and name.lower().endswith(_CARRIED_SUFFIXES)
                and name not in _WRITTEN_BY_SAVE
                and not (out / name).exists()
            ):
                shutil.copyfile(item, out / name)
        _zip_folder(out, dst)


def _zip_folder(folder: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo.from_file(path, path.relative_to(folder).as_posix())
            info.date_time = (1980, 1, 1, 0, 0, 0)  # reproducible bytes for identical folders
            info.external_attr = 0o644 << 16
            with path.open("rb") as src, zf.open(info, "w", force_zip64=info.file_size > 2**31) as out:
                shutil.copyfileobj(src, out, 1024**2)
    tmp.replace(dst)


# ----------------------------------------------------------------------------------------------------
# Loading and running


def load_model(folder: Path, **kwargs: Any) -> transformers.PreTrainedModel:
    """The folder's model through the Auto class of its task: no remote code, safetensors only, no network."""
    config = read_config(folder)
    try:
        _, _, task = task_of(config)
    except InvalidUpload as exc:
        raise CompressionError(exc.code, exc.message, exc.details) from exc
    auto = getattr(transformers, _AUTO_CLASSES[task])
    with torch_errors("unsupported_model", f"loading the model with transformers.{_AUTO_CLASSES[task]}"):
        model = auto.from_pretrained(
            str(folder), trust_remote_code=False, use_safetensors=True, local_files_only=True, **kwargs
        )
    return model.train(False)  # inference behaviour of dropout and norms


def _accepted_inputs(model: nn.Module) -> list[str]:
    params = inspect.signature(model.forward).parameters
    return [n for n in TEXT_INPUTS if n in params]


def _primary(model: nn.Module, out: Any) -> torch.Tensor:
    value = getattr(out, "logits", None)
    if value is None:
        value = getattr(out, "last_hidden_state", None)
    if value is None:
        raise CompressionError("unsupported_model", f"{type(model).__name__} returns neither logits nor hidden states")
    return value  # type: ignore[no-any-return]


def _feed(names: list[str], inputs: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    if "input_ids" not in inputs:
        raise CompressionError(
            "input_mismatch",
            f"the data has no 'input_ids'; the model takes {names}",
            {"expected_inputs": names, "given": sorted(inputs)},
        )
    return {
        n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device=device, dtype=torch.long)
        for n in names
        if n in inputs
    }


class HfRunner:
    """Eager transformers model under ``torch.inference_mode``: token arrays in, primary output (float32) out."""

    def __init__(self, folder: Path, device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise CompressionError("device_unavailable", "CUDA was requested but this worker has no usable GPU")
        self.device = device
        self.model = load_model(folder).to(device)
        self.input_names = _accepted_inputs(self.model)
        self.runtime = (
            f"torch {torch.__version__.split('+')[0]} {device} (transformers {transformers.__version__}, eager)"
        )

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = _feed(self.input_names, inputs, self.device)
        with torch.inference_mode():
            out = self.model(**feed)
        return [_primary(self.model, out).detach().float().cpu().numpy()]


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor (a torchao quantized weight dequantized)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize"):
        return t.dequantize()  # type: ignore[no-any-return]
    return t


def _stored_bits_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(bits per weight, bytes) as stored: a torchao tensor's codes and scales, else the tensor itself."""
    parts = getattr(t, "tensor_data_names", None)
    if type(t) not in (torch.Tensor, nn.Parameter) and parts:
        tensors = [getattr(t, name) for name in parts]
        codes = tensors[0]
        return codes.element_size() * 8, sum(x.numel() * x.element_size() for x in tensors)
    return t.element_size() * 8, t.numel() * t.element_size()


def _prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """Floating-point nn.Linear layers by weight name; a weight tied to an embedding table is left out (pruning it
    would prune the embedding too)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Linear)
            and type(module.weight) in (torch.Tensor, nn.Parameter)
            and module.weight.is_floating_point()
            and id(module.weight) not in embedded
        ):
            found[f"{name}.weight"] = module
    return found


def _load_prunable(src: Path) -> tuple[Path, transformers.PreTrainedModel, dict[str, nn.Linear]]:
    """(folder, model, its prunable nn.Linear layers), or ``nothing_to_prune``."""
    folder = model_folder(src)
    model = load_model(folder)
    linears = _prunable(model)
    if not linears:
        raise CompressionError("nothing_to_prune", "the model has no floating-point nn.Linear weights to prune")
    return folder, model, linears


def _weight_rows(model: nn.Module) -> list[dict[str, Any]]:
    owners = {f"{n}.{p}" if n else p: m for n, m in model.named_modules() for p, _ in m.named_parameters(recurse=False)}
    prunable = _prunable(model)
    rows = []
    for name, param in model.named_parameters():
        dense = _dense(param.detach())
        numel = dense.numel()
        nonzero = int(torch.count_nonzero(dense))
        bits, nbytes = _stored_bits_bytes(param.detach())
        rows.append(
            {
                "name": name,
                "op": type(owners[name]).__name__ if name in owners else None,
                "shape": list(dense.shape),
                "parameters": numel,
                "nonzero": nonzero,
                "sparsity": round(1 - nonzero / numel, 6) if numel else 0.0,
                "bits": bits,
                "bytes": nbytes,
                "prunable": name in prunable,
            }
        )
    return rows


@functools.lru_cache(maxsize=_EXTRACTED_KEEP)
def _rows_of(folder: Path) -> list[dict[str, Any]]:
    """The weight rows of an extracted folder (never written after extraction), computed once per folder."""
    return _weight_rows(load_model(folder))


def _example_batch(model: transformers.PreTrainedModel, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    limit = getattr(config, "max_position_embeddings", None) or _EXAMPLE_SEQUENCE
    seq = max(2, min(_EXAMPLE_SEQUENCE, int(limit)))
    rng = np.random.default_rng(seed)
    arrays = {
        "input_ids": rng.integers(0, vocab, size=(batch_size, seq), dtype=np.int64),
        "attention_mask": np.ones((batch_size, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch_size, seq), dtype=np.int64),
    }
    if batch_size > 1:
        arrays["attention_mask"][-1, seq // 2 :] = 0  # one padded row: padding paths get exercised too
    return {n: arrays[n] for n in _accepted_inputs(model)}


def _check_loads(dst: Path) -> None:
    """Load a written folder and run it once, so a broken artifact fails the step that wrote it."""
    runner = HfRunner(model_folder(dst), "cpu")
    with torch_errors("invalid_output", "running the written model"):
        runner(_example_batch(runner.model, 2))


# ----------------------------------------------------------------------------------------------------
# Text datasets (JSONL), tokenized with the folder's own tokenizer in the confined child


def load_text_dataset(path: Path, model_path: Path, *, limit: int | None = None) -> EvalData:
    """The JSONL dataset at ``path`` tokenized by the model's tokenizer: padded to the longest text, truncated to
    ``min(512, max_position_embeddings, model_max_length)`` tokens; class names mapped through ``label2id``."""
    from app.inspection.text_dataset import iter_records

    folder = model_folder(model_path)
    config = read_config(folder)
    with torch_errors("tokenizer_failed", "loading the model's tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=False, local_files_only=True
        )
    try:
        records = list(iter_records(path, limit=limit))
    except InvalidUpload as exc:
        raise CompressionError(exc.code, exc.message, exc.details) from exc
    bounds = [MAX_TEXT_TOKENS, config.get("max_position_embeddings"), getattr(tokenizer, "model_max_length", None)]
    max_length = min(int(b) for b in bounds if isinstance(b, int) and b > 0)
    texts = [r.text for r in records]
    pairs = [r.text_pair or "" for r in records] if records[0].text_pair is not None else None
    with torch_errors("tokenizer_failed", "tokenizing the dataset"):
        encoded = tokenizer(texts, pairs, padding="longest", truncation=True, max_length=max_length)
    inputs = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in TEXT_INPUTS}
    labels = None
    if records[0].label is not None:
        raw = [r.label for r in records]
        if isinstance(raw[0], str):
            names = {str(v): int(k) for k, v in (config.get("id2label") or {}).items()}
            unknown = sorted({str(v) for v in raw if v not in names})
            if unknown:
                raise CompressionError(
                    "dataset_mismatch", f"labels {unknown[:10]} are not classes of the model ({sorted(names)[:20]})"
                )
            labels = np.asarray([names[str(v)] for v in raw], dtype=np.int64)
        else:
            labels = np.asarray(raw, dtype=np.int64)
    return EvalData(inputs=inputs, labels=labels)


# ----------------------------------------------------------------------------------------------------
# Training adapter: pt2_training's train/quality/saliency work on any object with this interface


@dataclass
class HfProgram:
    """A transformers model bound to the job's data, with the interface ``pt2_training`` trains through."""

    model: transformers.PreTrainedModel
    data: EvalData
    fixed_batch: int | None = None
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = _accepted_inputs(self.model)

    def forward(self, idx: np.ndarray, data: EvalData | None = None) -> list[torch.Tensor]:
        feed = _feed(self.names, {k: v[idx] for k, v in (data or self.data).inputs.items()}, "cpu")
        return [_primary(self.model, self.model(**feed))]

    def outputs(self, idx: np.ndarray, data: EvalData | None = None) -> list[np.ndarray]:
        chunks = []
        with torch.no_grad():
            for start in range(0, len(idx), 256):
                chunks.append(self.forward(idx[start : start + 256], data)[0].detach().float().numpy())
        return [np.concatenate(chunks)]

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.is_floating_point()}

    def write_back(self) -> None:
        return None  # the parameters trained are the model's own


# ----------------------------------------------------------------------------------------------------
# The backend


class HfBackend:
    """FormatBackend for Hugging Face model folders (archived)."""

    name = "hf"
    suffix = ".zip"

    def open_runner(self, path: Path, device: str) -> HfRunner:
        return HfRunner(model_folder(path), device)

    def stored_size(self, path: Path) -> int:
        return folder_bytes(model_folder(path))

    def count_parameters(self, path: Path) -> tuple[int, int]:
        rows = _rows_of(model_folder(path))
        return sum(r["parameters"] for r in rows), sum(r["nonzero"] for r in rows)

    def example_inputs(self, path: Path, batch_size: int) -> dict[str, np.ndarray]:
        return _example_batch(load_model(model_folder(path)), batch_size)

    def layers(self, path: Path) -> list[dict[str, Any]]:
        """One row per parameter tensor: name, owning module, shape, parameters, nonzero, sparsity, bits, bytes."""
        return [dict(row) for row in _rows_of(model_folder(path))]  # copies: the pipeline annotates its rows

    def prunable_weights(self, path: Path) -> dict[str, tuple[np.ndarray, int]]:
        """nn.Linear weights ([out, in]; reduction axis 1) by parameter name."""
        model = load_model(model_folder(path))
        return {name: (m.weight.detach().float().numpy(), 1) for name, m in _prunable(model).items()}

    def weight_swapper(self, path: Path, device: str) -> ModuleWeightSwapper[HfRunner]:
        """One runner whose prunable weights are swapped in place (see ``weight_swap``), for per-layer sensitivity."""
        runner = self.open_runner(path, device)
        return ModuleWeightSwapper(runner, {name: m.weight for name, m in _prunable(runner.model).items()})

    def with_weights(self, src: Path, dst: Path, weights: dict[str, np.ndarray]) -> None:
        """Write ``src`` to ``dst`` with the named weights replaced (same dtype and shape)."""
        folder = model_folder(src)
        model = load_model(folder)
        with torch.no_grad():
            for name, values in weights.items():
                param = model.get_parameter(name)
                param.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(param.dtype))
        save_folder(model, folder, dst)

    def _write_masked(
        self, folder: Path, model: transformers.PreTrainedModel, masks: dict[str, np.ndarray], dst: Path
    ) -> tuple[list[dict[str, Any]], int, int]:
        layers, zeros, total = [], 0, 0
        with torch.no_grad():
            for name, mask in masks.items():
                w = model.get_parameter(name)
                w.mul_(torch.from_numpy(mask).to(w.dtype))
                z = w.numel() - int(torch.count_nonzero(w))
                zeros, total = zeros + z, total + w.numel()
                layers.append({"name": name, "shape": list(w.shape), "sparsity": round(z / w.numel(), 6)})
        save_folder(model, folder, dst)
        _check_loads(dst)
        return layers, zeros, total

    def prune_magnitude(self, src: Path, dst: Path, step: PruneMagnitude, ctx: StepContext | None = None) -> StepReport:
        folder, model, linears = _load_prunable(src)
        masks = step_masks(
            {name: m.weight.detach().abs().float().numpy() for name, m in linears.items()},
            sparsity=step.target_sparsity,
            scope=step.scope,
            pattern=parse_pattern(step.pattern) if step.pattern else None,
            overrides=step.overrides,
            reduction_axes=dict.fromkeys(linears, 1),
        )
        layers, zeros, total = self._write_masked(folder, model, masks, dst)
        return magnitude_report(step, layers, zeros, total)

    def prune_wanda(self, src: Path, dst: Path, step: PruneWanda, ctx: StepContext) -> StepReport:
        """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2 over the calibration tokens (padding left out), the lowest
        zeroed in each output neuron (or N:M along the input axis). Input norms come from forward pre-hooks on
        every nn.Linear during one pass over the job's data."""
        if ctx.data is None:
            raise CompressionError("dataset_required", "wanda scores weights by input activations: add a dataset")
        folder, model, linears = _load_prunable(src)
        data = ctx.data.head(step.calibration_samples)
        with torch_errors("calibration_failed", "running the model for wanda"):
            norms = _input_norms(model, linears, data)
        pattern = parse_pattern(step.pattern) if step.pattern else None
        masks = {}
        for name, module in linears.items():
            scores = module.weight.detach().abs().float().numpy() * norms[name][None, :]
            masks[name] = nm_mask(scores, *pattern, 1) if pattern else row_keep(scores, step.sparsity or 0.0, 1)
        layers, zeros, total = self._write_masked(folder, model, masks, dst)
        return StepReport(
            op="prune",
            method="wanda",
            details={
                "pattern": step.pattern,
                "requested_sparsity": step.sparsity if pattern is None else 1 - pattern[0] / pattern[1],
                "achieved_sparsity": round(zeros / total, 6) if total else 0.0,
                "calibration_samples": data.num_samples,
                "comparison_group": (
                    "each output neuron's weights" if pattern is None else "N:M groups along the input axis"
                ),
                "layers": layers,
            },
        )

    def finetune_distill(self, src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
        return _finetune(src, dst, step, ctx)

    def finetune_labels(self, src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
        return _finetune(src, dst, step, ctx)

    def quantize_int8_weight_only(
        self, src: Path, dst: Path, step: QuantizeInt8WeightOnly, ctx: StepContext
    ) -> StepReport:
        from torchao.quantization import Int8WeightOnlyConfig

        if step.include:
            raise CompressionError(
                "method_not_supported",
                "include: ['embedding'] is not available for hf models (transformers' torchao integration "
                "quantizes input embeddings only together with an lm_head)",
            )
        config = Int8WeightOnlyConfig(group_size=step.group_size) if step.group_size else Int8WeightOnlyConfig()
        return _torchao(src, dst, step.method, config)

    def quantize_int8_dynamic(self, src: Path, dst: Path, step: QuantizeInt8Dynamic, ctx: StepContext) -> StepReport:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor

        granularity = PerRow() if step.per_channel else PerTensor()
        return _torchao(src, dst, step.method, Int8DynamicActivationInt8WeightConfig(granularity=granularity))

    def quantize_fp16(self, src: Path, dst: Path, step: QuantizeFp16, ctx: StepContext) -> StepReport:
        return _half(src, dst, step.method, torch.float16)

    def quantize_bf16(self, src: Path, dst: Path, step: QuantizeBf16, ctx: StepContext) -> StepReport:
        return _half(src, dst, step.method, torch.bfloat16)

    def convert_onnx(self, src: Path, dst: Path, step: ConvertOnnx, ctx: StepContext) -> StepReport:
        """torch.onnx's dynamo exporter; batch and sequence dimensions dynamic, the data's inputs kept."""
        from worker.compress.convert import onnx_conversion_report
        from worker.compress.onnx_format import _save_model as _save_onnx

        folder = model_folder(src)
        with torch_errors("conversion_failed", "loading the model for export"):
            model = load_model(folder, attn_implementation="eager")
        accepted = _accepted_inputs(model)
        if ctx.data is not None and ctx.data.num_samples >= 2:
            head = ctx.data.head(8).inputs
            inputs = {n: head[n] for n in accepted if n in head}
        else:
            inputs = _example_batch(model, 2)
        if "input_ids" not in inputs:
            raise CompressionError("input_mismatch", "the data has no 'input_ids'")
        names = list(inputs)
        expected = HfRunner(folder, "cpu")(inputs)
        output = "last_hidden_state" if task_of(read_config(folder))[2] == "feature-extraction" else "logits"
        limit = int(getattr(model.config, "max_position_embeddings", None) or 4096)
        batch = torch.export.Dim("batch", min=1, max=65536)
        sequence = torch.export.Dim("sequence", min=1, max=limit)

        class Primary(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(
                self,
                input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
            ) -> torch.Tensor:
                extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
                kwargs = {k: v for k, v in extra.items() if v is not None}
                return _primary(self.inner, self.inner(input_ids=input_ids, **kwargs))

        feed = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).long() for n in names}
        # The exporter reports progress with print(); stdout is the sandbox's result channel.
        with (
            torch_errors("conversion_failed", "ONNX export (torch.onnx, dynamo)"),
            contextlib.redirect_stdout(sys.stderr),
        ):
            program = torch.onnx.export(
                Primary(model).train(False),
                (),
                kwargs=feed,
                input_names=names,
                output_names=[output],
                dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
                dynamo=True,
                external_data=False,
                optimize=True,
                opset_version=step.opset,
                verbose=False,
            )
            assert program is not None
            # Saved by the ONNX backend's writer: self-contained, and without the exporter's per-node stack traces
            # (the exporting machine's paths) that nothing reads at run time.
            _save_onnx(program.model_proto, dst)
        report = onnx_conversion_report(
            dst,
            inputs,
            expected,
            exporter=f"torch.onnx {torch.__version__.split('+')[0]} (dynamo exporter, transformers eager attention)",
            opset=step.opset,
        )
        report.notes.append(f"ONNX inputs: {', '.join(names)} (batch and sequence dynamic); output: {output}.")
        return report


def _input_norms(model: nn.Module, linears: dict[str, nn.Linear], data: EvalData) -> dict[str, np.ndarray]:
    """||X_j||_2 over every calibration token of each layer's input, padded tokens left out."""
    names = _accepted_inputs(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Any:
        def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            current = mask[0]
            if current is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(current.shape):
                x = x * current[..., None]
            sums[name] += (x.reshape(-1, x.shape[-1]) ** 2).sum(dim=0)

        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.inference_mode():
            for start in range(0, data.num_samples, _BATCH):
                feed = _feed(names, {k: v[start : start + _BATCH] for k, v in data.inputs.items()}, "cpu")
                attention = feed.get("attention_mask")
                mask[0] = (attention != 0).double() if attention is not None else None
                model(**feed)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.sqrt(s).float().numpy() for name, s in sums.items()}


def _sized(src: Path, dst: Path, report: StepReport) -> StepReport:
    before, after = folder_bytes(model_folder(src)), folder_bytes(model_folder(dst))
    report.details |= {"bytes_before": before, "bytes_after": after, "size_ratio": round(after / before, 4)}
    return report


def _torchao(src: Path, dst: Path, method: str, quant_type: Any) -> StepReport:
    """Quantize nn.Linear weights with torchao through transformers' TorchAoConfig (applied while loading) and
    save as safetensors: the folder loads with plain ``from_pretrained`` where torchao is installed."""
    folder = model_folder(src)
    with torch_errors("quantization_failed", f"{method} quantization (torchao)"):
        model = load_model(folder, quantization_config=transformers.TorchAoConfig(quant_type))
    quantized = [
        name for name, p in model.named_parameters() if type(p) not in (torch.Tensor, nn.Parameter) and p.dim() == 2
    ]
    if not quantized:
        raise CompressionError("nothing_to_quantize", "no nn.Linear weight of the model was quantized")
    save_folder(model, folder, dst)
    _check_loads(dst)
    notes = [
        f"{method}: {len(quantized)} nn.Linear weights stored as int8 with per-row scales (torchao "
        f"{_version('torchao')}, safetensors); embeddings and norms stay float. The folder loads with "
        "transformers' from_pretrained where torchao is installed. On CPU, eager int8 kernels may be slower than "
        "float32 (see the latency); torch.compile is where torchao gets its speed."
    ]
    details = {"method": method, "quantized_layers": len(quantized), "layers": quantized}
    return _sized(src, dst, StepReport(op="quantize", method=method, details=details, notes=notes))


def _half(src: Path, dst: Path, method: str, dtype: torch.dtype) -> StepReport:
    folder = model_folder(src)
    with torch_errors("quantization_failed", f"{method} conversion"):
        model = load_model(folder, dtype=dtype)
    halves = sum(1 for p in model.parameters() if p.dtype == dtype)
    save_folder(model, folder, dst)
    _check_loads(dst)
    notes = [
        f"Parameters stored and computed in {dtype} (config.json records the dtype); outputs are reported in "
        f"float32. CPU {method} kernels can be slower than float32 (see the latency)."
    ]
    return _sized(src, dst, StepReport(op="quantize", method=method, details={"half_tensors": halves}, notes=notes))


def _finetune(src: Path, dst: Path, step: Finetune, ctx: StepContext) -> StepReport:
    """Recover accuracy after pruning (labels or distillation from the original's outputs); zeros stay zero.

    The training loop and the report are pt2_training's (Adam, masked gradients, fixed seeds, held-out 20% or the
    job's train dataset), run on the transformers model in eval mode (dropout off, as for .pt2 programs).
    """
    from worker.compress.pt2_training import finetune_steps

    if ctx.data is None:  # before loading the model
        raise CompressionError("dataset_required", f"finetune/{step.method} trains on the job's dataset; it has none")
    folder = model_folder(src)
    model = load_model(folder)

    def save() -> None:
        save_folder(model, folder, dst)
        _check_loads(dst)

    return finetune_steps(
        step,
        ctx,
        build=lambda data: HfProgram(model, data),
        save=save,
        reload=lambda data: HfProgram(load_model(model_folder(dst)), data),
    )


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
