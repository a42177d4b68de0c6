"""A small real transformers sequence classifier for the tests: BERT (2 layers, hidden 64) trained on scikit-learn's
digits, written as text.

scikit-learn ships no text data set that needs no download, so each 8x8 digit becomes a sentence: one word per
pixel of intensity >= 4, naming its row, column and level (``l`` for 4-9, ``h`` for 10-16), e.g. ``"l02 h03 h12"``.
The classes and the held-out accuracy are the real ones of the digits task (0.88 after 12 short epochs here). The
tokenizer is a WordPiece ``BertTokenizer`` over those 128 words.

Trained once and cached on disk under ``.pytest_cache`` keyed by this file's content (about a minute on 2 busy
cores); archive helpers live in ``hf_folders`` so that editing them does not retrain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"{level}{r}{c}" for level in "lh" for r in range(8) for c in range(8)]
EPOCHS = 12


def _sentence(image: np.ndarray) -> str:
    return " ".join(
        f"{'h' if v >= 10 else 'l'}{r}{c}" for r in range(8) for c in range(8) if (v := int(image[r, c])) >= 4
    )


def digits_texts() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train texts, train labels, test texts, test labels): the split tests/support/models.py uses (1400 / 397)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    texts = [_sentence(img) for img in d.images]
    labels = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(texts))
    train, test = idx[:1400], idx[1400:]
    return [texts[i] for i in train], labels[train], [texts[i] for i in test], labels[test]


def digits_jsonl_bytes(n: int | None = None, *, labels: bool = True, names: bool = False) -> bytes:
    """The held-out digits as JSONL: ``{"text": ..., "label": 3}`` (or ``"LABEL_3"`` with ``names``)."""
    _, _, texts, y = digits_texts()
    if n is not None:
        texts, y = texts[:n], y[:n]
    lines = []
    for text, label in zip(texts, y, strict=True):
        record: dict[str, object] = {"text": text}
        if labels:
            record["label"] = f"LABEL_{int(label)}" if names else int(label)
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def _tokenizer():  # -> transformers.BertTokenizer
    from transformers import BertTokenizer

    return BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL + WORDS)})


def _train(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    train_texts, train_y, _, _ = digits_texts()
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    enc = tokenizer(train_texts, padding=True, return_tensors="pt")
    y = torch.from_numpy(train_y)
    batch = 64
    steps = EPOCHS * -(-len(y) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    order = np.random.default_rng(0)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.from_numpy(order.permutation(len(y)))
        for i in range(0, len(y), batch):
            b = perm[i : i + batch]
            out = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b], labels=y[b])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    # Written beside, then renamed: test sessions running at the same time may both train; the first rename wins.
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def classifier_folder() -> Path:
    """The trained classifier as a Hugging Face folder (config, model.safetensors, tokenizer files)."""
    folder = _cache_dir() / "digits-bert"
    if not folder.exists():
        _train(folder)
    return folder


def classifier_zip_bytes() -> bytes:
    """The trained classifier's folder zipped under a root folder, as a user would zip it."""
    from tests.support.hf_folders import folder_zip_bytes

    return folder_zip_bytes(classifier_folder(), root="digits-bert")


def held_out_accuracy(folder: Path) -> float:
    """Accuracy of the folder's model on the held-out digits, with plain transformers (its own tokenizer)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, _, texts, y = digits_texts()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(1).numpy()
    return float((pred == y).mean())


def _cache_dir() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    d = ROOT / ".pytest_cache" / "squeeze-models" / f"hf-{digest}"
    d.mkdir(parents=True, exist_ok=True)
    return d
