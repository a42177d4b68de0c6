"""MiniLM-L6 int8_dynamic vs fp32 in bare ONNX Runtime at several sequence lengths: does the int8 gain grow with
longer inputs?

    .venv/bin/python bench/minilm_int8_shapes.py     # ~1 minute

bench/minilm_int8.py measures the latency ratio on the model's 32 test sentences (18 tokens each), as the issue's
by-hand figure (3.4x) was taken. This asks whether a longer input, where the matrix products weigh more, moves the
ratio. Plain ONNX Runtime only, nothing from the service: the model exported as in tests/support/minilm.py,
`quant_pre_process` + `quantize_dynamic(per_channel=True, weight_type=QInt8)` as the service and the bare script do,
then batch 32 x N random token ids (all attended), 3 warm-up runs and the p50 of 10 timed runs per session, the two
sessions with one intra-op thread per core. No target: the printed ratios are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import header, load_line, print_table

from tests.support.minilm import minilm_onnx_path


def p50_ms(session: Any, feed: dict[str, np.ndarray], warmup: int = 3, runs: int = 10) -> float:
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="18,64,128,256", help="sequence lengths (default 18,64,128,256)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = minilm_onnx_path()
    header("MiniLM-L6 int8_dynamic vs fp32, bare ONNX Runtime, by sequence length")
    rows = []
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-shapes-") as tmp:
        pre, int8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(int8), per_channel=True, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        fp32 = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        q8 = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        for length in (int(v) for v in args.lengths.split(",")):
            ids = rng.integers(1000, 20000, size=(args.batch, length)).astype(np.int64)
            ids[:, 0] = 101  # [CLS]
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            before, after = p50_ms(fp32, feed), p50_ms(q8, feed)
            rows.append((f"{args.batch} x {length}", before, after, before / after))
    print(f"threads : {options.intra_op_num_threads} per session; onnxruntime {ort.__version__}\n")
    print_table(["batch x tokens", "p50 ms fp32", "p50 ms int8", "fp32 / int8"], rows)
    print(f"\n{load_line('other processes, after the run')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
