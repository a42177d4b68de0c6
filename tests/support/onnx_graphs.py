"""Small ONNX graphs built in code with known weights, for the catalogue's tests: an MLP of Gemms, a text model
whose embedding table dominates its bytes, and a CNN with every op the structured pruner traces through or stops at.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_graph(path: Path, nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(
        nodes, "test", inputs, outputs, [numpy_helper.from_array(v.astype(v.dtype), k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_model(path: Path, widths: tuple[int, ...] = (256, 512, 512, 64)) -> Path:
    """Gemm (transB=1, as torch exports Linear) + Relu layers: the weight-only quantizers' MLP."""
    rng = np.random.default_rng(1)
    nodes, inits, x = [], {}, "x"
    for i, (k, n) in enumerate(itertools.pairwise(widths)):
        inits[f"fc{i}.weight"] = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        inits[f"fc{i}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"h{i}"], transB=1))
        x = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    return save_graph(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])],
        inits,
    )


def text_model(path: Path, vocab: int = 2000, dim: int = 64) -> Path:
    """ids -> embedding Gather -> MatMul + bias -> Gelu -> MatMul: a table that dominates the bytes."""
    rng = np.random.default_rng(2)
    inits = {
        "embedding": rng.standard_normal((vocab, dim)).astype(np.float32),
        "up.weight": (rng.standard_normal((dim, 4 * dim)) / np.sqrt(dim)).astype(np.float32),
        "up.bias": (0.1 * rng.standard_normal(4 * dim)).astype(np.float32),
        "down.weight": (rng.standard_normal((4 * dim, dim)) / np.sqrt(4 * dim)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["h0"]),
        helper.make_node("MatMul", ["h0", "up.weight"], ["h1"]),
        helper.make_node("Add", ["h1", "up.bias"], ["h2"]),
        helper.make_node("Gelu", ["h2"], ["h3"], domain=""),
        helper.make_node("MatMul", ["h3", "down.weight"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", dim])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def branchy_cnn(path: Path) -> Path:
    """Two conv branches (one through BatchNormalization) concatenated, scaled per channel, a 1x1 conv, a residual
    block, max pooling, Flatten and two Gemms: every op the structured pruner traces through or stops at."""
    rng = np.random.default_rng(3)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {
        "a.weight": w(8, 3, 3, 3),
        "a.bias": (0.2 * rng.standard_normal(8)).astype(np.float32),
        "bn.scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "bn.bias": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "bn.mean": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "bn.var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "b.weight": w(6, 3, 1, 1),
        "b.bias": (0.2 * rng.standard_normal(6)).astype(np.float32),
        "gate": rng.uniform(0.5, 1.5, (14, 1, 1)).astype(np.float32),
        "c.weight": w(10, 14, 1, 1),
        "c.bias": (0.2 * rng.standard_normal(10)).astype(np.float32),
        "d.weight": w(10, 10, 1, 1),
        "fc1.weight": w(16, 10 * 4 * 4),
        "fc1.bias": (0.2 * rng.standard_normal(16)).astype(np.float32),
        "fc2.weight": w(5, 16),
        "fc2.bias": np.zeros(5, np.float32),
        "flat": np.array([0, -1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "a.weight", "a.bias"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["a_bn"]),
        helper.make_node("Relu", ["a_bn"], ["a_r"]),
        helper.make_node("Conv", ["x", "b.weight", "b.bias"], ["b"]),
        helper.make_node("Sigmoid", ["b"], ["b_s"]),
        helper.make_node("Mul", ["b", "b_s"], ["b_r"]),  # SiLU: two traced copies of the same channels
        helper.make_node("Concat", ["a_r", "b_r"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "gate"], ["gated"]),
        helper.make_node("Conv", ["gated", "c.weight", "c.bias"], ["c"]),
        helper.make_node("Relu", ["c"], ["c_r"]),
        helper.make_node("Conv", ["c_r", "d.weight"], ["d"]),
        helper.make_node("Add", ["d", "c_r"], ["res"]),  # residual: c and d stay whole
        helper.make_node("MaxPool", ["res"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pool", "flat"], ["flat_out"]),
        helper.make_node("Gemm", ["flat_out", "fc1.weight", "fc1.bias"], ["f1"], transB=1),
        helper.make_node("Relu", ["f1"], ["f1_r"]),
        helper.make_node("Gemm", ["f1_r", "fc2.weight", "fc2.bias"], ["y"], transB=1),
    ]
    return save_graph(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
