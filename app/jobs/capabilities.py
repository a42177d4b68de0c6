"""Which method runs on which format, and what it needs. ``GET /v1/capabilities`` serves this table, and job
submission refuses any pair not listed here, so nothing unsupported reaches a worker."""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:  # the version the workers of this deployment run (same image); read from metadata, transformers not imported
    _TRANSFORMERS_VERSION = metadata.version("transformers")
except metadata.PackageNotFoundError:
    _TRANSFORMERS_VERSION = "(not installed)"

_PRUNE = {
    "magnitude": {
        "description": "Unstructured magnitude pruning to an exact sparsity, global or per layer.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "stored_size": "unchanged: zeros are stored densely (the report says so)",
    },
}

_ONNX_QUANT = {
    "int8_dynamic": {
        "description": "ONNX Runtime dynamic quantization, int8 weights (per channel by default).",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "int8_static": {
        "description": "ONNX Runtime static QDQ quantization, activations calibrated on the dataset.",
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "fp16": {
        "description": "Float16 weights and compute; float32 inputs and outputs kept.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
    "int8_weight_only": {
        "description": (
            "Int8 MatMul/Gemm weights packed into ONNX Runtime's MatMulNBits, float activations; group_size a power "
            "of two 16-256 (default: per output channel, in blocks of up to 256 along K). include: ['embedding'] "
            "also packs Gather tables (GatherBlockQuantized, one scale per row). Conv layers stay float."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "int4_weight_only": {
        "description": (
            "Int4 MatMul/Gemm weights, two per byte (MatMulNBits), in groups of group_size (16-256) along K, "
            "symmetric or with zero points; include: ['embedding'] packs Gather tables too. Conv layers stay float."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
}

_ONNX_PRUNE = {
    **_PRUNE,
    "structured": {
        "description": (
            "Removes whole output channels of Conv/Gemm/MatMul layers (lowest L1/L2 norm) and resizes the layers "
            "that read them, folding removed channels' constant outputs into their biases: a smaller, faster "
            "graph. Layers whose channels reach a graph output, a residual Add, attention heads or an op it "
            "cannot resize are left whole (listed in the report)."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "stored_size": "smaller: channels are removed",
    },
    "wanda": {
        "description": (
            "Wanda: |weight| x input-activation norm (from the dataset, padded tokens left out), the lowest zeroed "
            "in each output neuron of MatMul/Gemm layers, to a sparsity or N:M. Conv layers are left alone."
        ),
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "stored_size": "unchanged: zeros are stored densely (the report says so)",
    },
}

_PT2_QUANT = {
    "int8_dynamic": {
        "description": "torchao PT2E dynamic quantization (X86InductorQuantizer), int8 weights. CPU only: the "
        "quantizer targets x86 kernels.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "int8_static": {
        "description": "torchao PT2E static quantization (X86InductorQuantizer), calibrated on the dataset. CPU "
        "only: the quantizer targets x86 kernels.",
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "fp16": {
        "description": "Float16 parameters and compute; float32 inputs and outputs kept.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
}

_ENCODE = {
    "squeeze": {
        "description": (
            "Storage encoding (Deep Compression's last stage): non-zero positions as a bitmask or gaps, values "
            "quantized per channel to value_bits (or, value_coding kmeans, indices into a per-tensor k-means "
            "codebook), other float tensors exact or float16 (float_tensors), zstd. Must be the last step; decode "
            "with squeeze.loader."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "produces": "squeeze",
    },
}

_TORCHSCRIPT_QUANT = {
    "fp16": {
        "description": "Float16 parameters and buffers and compute; the archive's forward keeps float32 inputs "
        "and outputs.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
    "bf16": {
        "description": "Bfloat16 parameters and buffers and compute; the archive's forward keeps float32 inputs "
        "and outputs.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
}

_CONVERT_ONNX = {
    "onnx": {
        "description": (
            "Export to ONNX (torch.onnx), batch dimension dynamic, checked against the source model in ONNX "
            "Runtime; later steps use the ONNX methods and the result is measured in ONNX Runtime."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "produces": "onnx",
    },
}

_PT2_PRUNE = {
    "magnitude": {
        **_PRUNE["magnitude"],
        "description": (
            "Magnitude pruning: unstructured to an exact sparsity (global or per layer), or N:M such as 2:4. On CUDA "
            "(compute capability 8.0+) the result's 2:4 Linear weights in float16/bfloat16 (add quantize/fp16 after "
            "the prune) are measured with torch's semi-structured sparse kernels; the report's kernels say so."
        ),
    },
    "gradient": {
        "description": (
            "First-order Taylor saliency |w * dL/dw| accumulated over `samples` of the dataset (labels; without "
            "labels, the original's top-1 class), then the lowest-saliency weights zeroed to an exact sparsity."
        ),
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "stored_size": "unchanged: zeros are stored densely (the report says so)",
    },
    "regularized": {
        "description": (
            "Short training with an L1/L2 penalty on the prunable weights (labels, else distillation from the "
            "original), then magnitude thresholding to an exact sparsity. Reports accuracy before, after training "
            "and after thresholding."
        ),
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
        "stored_size": "unchanged: zeros are stored densely (the report says so)",
    },
}

_PT2_FINETUNE = {
    "distill": {
        "description": (
            "Recover accuracy after pruning by distilling from the original model's outputs on the dataset "
            "(KL at `temperature` on logits, MSE on other outputs); zeros stay zero. Reports before/after on a "
            "held-out 20%."
        ),
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
    "labels": {
        "description": (
            "Recover accuracy after pruning by training on the dataset's labels (cross-entropy); zeros stay zero. "
            "Reports before/after on a held-out 20%."
        ),
        "needs_dataset": True,
        "needs_labels": True,
        "devices": ["cpu", "cuda"],
    },
}

_PT2_WEIGHT_ONLY = {
    "int8_weight_only": {
        "description": (
            "Linear weights (and embedding tables with include) as int8 codes with float16 scales per row or per "
            "group, decoded in the graph; loads with torch.export.load alone. ~4x smaller weights, not faster. On "
            "CUDA the result is measured with torchao's Int8Tensor built from the same codes (per-row scales)."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
    "int4_weight_only": {
        "description": (
            "Linear weights (and embedding tables with include) as int4 codes packed two per byte with float16 "
            "scales per group, decoded in the graph; loads with torch.export.load alone. ~7-8x smaller weights. On "
            "CUDA (compute capability 8.0+, groups of 32-256) the result is measured with torchao's tinygemm int4 "
            "kernel built from the same codes (bfloat16 activations inside)."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
    "bf16": {
        "description": "Bfloat16 parameters and compute; float32 inputs and outputs kept.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu", "cuda"],
    },
}

_HF_PRUNE = {
    "magnitude": {
        **_PRUNE["magnitude"],
        "description": (
            "Unstructured magnitude pruning of the nn.Linear weights (attention, feed-forward, pooler, classifier; "
            "embeddings and norms are left alone) to an exact sparsity, global or per layer, or N:M."
        ),
        "devices": ["cpu"],
    },
    "wanda": {
        "description": (
            "Wanda: |weight| x input-activation norm of every nn.Linear (collected with forward hooks over the "
            "dataset, padded tokens left out), the lowest zeroed in each output neuron, to a sparsity or N:M."
        ),
        "needs_dataset": True,
        "needs_labels": False,
        "devices": ["cpu"],
        "stored_size": "unchanged: zeros are stored densely (the report says so)",
    },
}

_HF_QUANT = {
    "int8_weight_only": {
        "description": (
            "torchao Int8WeightOnlyConfig on every nn.Linear (per row, or group_size), applied through "
            "transformers' TorchAoConfig and saved as safetensors: the folder loads with from_pretrained where "
            "torchao is installed. include: ['embedding'] is not available for hf models."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
        # transformers' torchao integration quantizes input embeddings only together with an lm_head.
        "unsupported_options": ["include"],
    },
    "int8_dynamic": {
        "description": (
            "torchao Int8DynamicActivationInt8WeightConfig on every nn.Linear (int8 weights per row, or per tensor "
            "with per_channel false; activations quantized per batch), saved as safetensors like int8_weight_only."
        ),
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "fp16": {
        "description": "Float16 parameters and compute (config.json records the dtype); outputs reported in float32.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
    "bf16": {
        "description": "Bfloat16 parameters and compute (config.json records the dtype); outputs reported in float32.",
        "needs_dataset": False,
        "needs_labels": False,
        "devices": ["cpu"],
    },
}

_HF_CONVERT_ONNX = {
    "onnx": {
        **_CONVERT_ONNX["onnx"],
        "description": (
            "Export to ONNX (torch.onnx dynamo exporter, eager attention): inputs input_ids/attention_mask"
            "/token_type_ids as the dataset has them, batch and sequence dynamic, output logits or "
            "last_hidden_state; checked in ONNX Runtime. Later steps use the ONNX methods."
        ),
        "devices": ["cpu"],
    },
}

# A step whose info has "produces" changes the model's format: later steps are looked up under that format.
CAPABILITIES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "onnx": {"prune": _ONNX_PRUNE, "quantize": _ONNX_QUANT, "encode": _ENCODE},
    "pt2": {
        "prune": _PT2_PRUNE,
        "quantize": {**_PT2_QUANT, **_PT2_WEIGHT_ONLY},
        "finetune": _PT2_FINETUNE,
        "convert": _CONVERT_ONNX,
    },
    "torchscript": {"prune": _PRUNE, "quantize": _TORCHSCRIPT_QUANT, "convert": _CONVERT_ONNX},
    "hf": {
        "prune": _HF_PRUNE,
        "quantize": _HF_QUANT,
        "finetune": {name: {**info, "devices": ["cpu"]} for name, info in _PT2_FINETUNE.items()},
        "convert": _HF_CONVERT_ONNX,
    },
}

FORMATS: dict[str, dict[str, Any]] = {
    "onnx": {
        "description": "ONNX model: a single .onnx file, or a .zip of an .onnx with its external-data files.",
        "runtime": "onnxruntime",
        "output": "onnx",
        "suffix": ".onnx",
    },
    "pt2": {
        "description": "torch.export program saved with torch.export.save (.pt2).",
        "runtime": "torch (torch.export)",
        "output": "pt2",
        "suffix": ".pt2",
    },
    "torchscript": {
        "description": (
            "TorchScript archive saved with torch.jit.save (scripted or traced). Scripted archives record no "
            "input shapes: jobs on them need a dataset. The archive's code runs only in the sandboxed worker."
        ),
        "runtime": "torch (TorchScript interpreter)",
        "output": "torchscript",
        "suffix": ".pt",
    },
    "hf": {
        "description": (
            "Hugging Face model folder: config.json + model.safetensors (or sharded with "
            "model.safetensors.index.json), tokenizer files optional, uploaded as a .zip or a plain .tar. Loaded "
            "with trust_remote_code=False and safetensors only; folders with custom code or only pickled weights "
            "are refused. Sequence classifiers, token classifiers and base encoders. Results are a .zip of the "
            "output folder (save_pretrained + the tokenizer files), stored uncompressed. Text datasets: JSONL."
        ),
        "runtime": f"transformers {_TRANSFORMERS_VERSION} (torch, eager)",
        "output": "hf",
        "suffix": ".zip",
    },
    "squeeze": {
        "description": (
            "Squeeze storage encoding (.sqz, docs/SQUEEZE_FORMAT.md): the output of an encode/squeeze step. "
            "squeeze.loader decodes it to ONNX; it is never accepted as an upload."
        ),
        "runtime": "onnxruntime (decoded by squeeze.loader)",
        "output": "squeeze",
        "suffix": ".sqz",
        "output_only": True,
    },
}


def method_info(fmt: str, op: str, method: str) -> dict[str, Any] | None:
    return CAPABILITIES.get(fmt, {}).get(op, {}).get(method)


def plan_formats(fmt: str, steps: list[Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """For each step, the model format it receives and its capability entry (None: not supported there).

    Formats change along a pipeline (``convert`` to ONNX, ``encode`` to a squeeze file), so each step is looked up
    under the format the previous steps produced. After an unsupported step the format is left unchanged.
    """
    plan: list[tuple[str, dict[str, Any] | None]] = []
    for step in steps:
        info = method_info(fmt, step.op, step.method)
        plan.append((fmt, info))
        if info is not None:
            fmt = info.get("produces", fmt)
    return plan


def suffix_of(fmt: str) -> str:
    """File suffix of a stored model of this format."""
    return str(FORMATS[fmt]["suffix"])
