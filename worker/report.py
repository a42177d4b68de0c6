"""A job's report as readable Markdown: what was gained and lost, per layer, and how to reproduce it.

Pure: takes the report dictionary the runner stores as JSON (``report.json``) and returns text. No HTML: Markdown
renders on GitHub, in notebooks and in the dashboard, and reads fine as plain text in a terminal.
"""

from __future__ import annotations

import json
from typing import Any

_ROWS: list[tuple[str, str]] = [
    ("size_bytes", "Size (bytes)"),
    ("parameters", "Parameters"),
    ("nonzero_parameters", "Non-zero parameters"),
    ("sparsity", "Sparsity"),
    ("accuracy", "Accuracy (top-1)"),
    ("agreement", "Agreement with original (top-1)"),
    ("cosine", "Cosine to original outputs"),
    ("max_abs_error", "Max abs error"),
]


def render_markdown(report: dict[str, Any]) -> str:
    metrics = report.get("metrics") or {}
    base = metrics.get("baseline") or {}
    result = metrics.get("result") or {}
    inputs = report.get("inputs") or {}
    model = inputs.get("model") or {}
    dataset = inputs.get("dataset")
    train = inputs.get("train_dataset")
    lines = [
        f"# Squeeze report: job {report.get('job_id', '?')}",
        "",
        f"Model `{model.get('id', '?')}` ({model.get('format', '?')}, sha256 `{model.get('sha256', '?')}`)"
        + (f", dataset `{dataset['id']}` (sha256 `{dataset['sha256']}`)" if dataset else ", no dataset")
        + (
            f", train dataset `{train['id']}` (sha256 `{train['sha256']}`; only the training steps train on it, "
            "every metric below is on the dataset)"
            if train
            else ""
        )
        + f". Measured on `{report.get('device', '?')}`.",
        "",
        "## Before and after",
        "",
        "| Metric | Original | Compressed | Change |",
        "|---|---:|---:|---:|",
    ]
    for key, label in _ROWS:
        if base.get(key) is None and result.get(key) is None:
            continue
        lines.append(f"| {label} | {_fmt(base.get(key))} | {_fmt(result.get(key))} | {_change(key, base, result)} |")
    for side, name in ((base, "Original"), (result, "Compressed")):
        lat = side.get("latency_ms")
        if lat:
            lines.append(
                f"| Latency p50 / p95 (ms, batch {lat.get('batch_size')}), {name} | "
                f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} | | |"
            )
    if base.get("latency_ms") and result.get("latency_ms"):
        speedup = base["latency_ms"]["p50"] / max(result["latency_ms"]["p50"], 1e-9)
        lines.append(f"| Speed-up (p50) | | | {speedup:.2f}x |")
    lines += ["", f"Runtimes: original `{base.get('runtime', '?')}`; compressed `{result.get('runtime', '?')}`.", ""]

    steps = report.get("steps") or []
    if steps:
        lines += ["## Recipe", ""]
        spec_steps = (report.get("spec") or {}).get("steps") or []
        for i, step in enumerate(steps, start=1):
            details = {k: v for k, v in (step.get("details") or {}).items() if k != "layers"}
            lines.append(f"{i}. **{step['op']} / {step['method']}**: `{json.dumps(details, default=str)[:600]}`")
        lines += ["", "Job spec, as submitted:", "", "```json", json.dumps(spec_steps, indent=2), "```", ""]

    layers = _layer_rows(base.get("layers"), result.get("layers"))
    if layers:
        lines += [
            "## Per layer",
            "",
            "| Layer | Op | Shape | Parameters | Sparsity | Bits | Bytes before | Bytes after | Sensitivity |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in layers:
            lines.append(
                f"| `{row['name']}` | {row.get('op') or ''} | {'x'.join(map(str, row.get('shape', [])))} | "
                f"{row.get('parameters', '')} | {_fmt(row.get('sparsity_after'))} | {row.get('bits_after', '')} | "
                f"{row.get('bytes', '')} | {row.get('bytes_after', '')} | {_fmt(row.get('sensitivity'))} |"
            )
        lines += [
            "",
            "Sensitivity: the change in the job's metric (accuracy with labels, else cosine) when only that layer "
            "is compressed; most negative = most sensitive. 'after' columns are blank where a step renamed or "
            "restructured the tensor.",
            "",
        ]
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    env = report.get("environment") or {}
    lines += ["## Reproduce", ""]
    lines.append(
        "Same input bytes (sha256 above), same spec, same library versions: "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + (f"; pipeline wall time {report['pipeline_wall_s']} s." if "pipeline_wall_s" in report else ".")
    )
    return "\n".join(lines) + "\n"


def _layer_rows(base: list[dict[str, Any]] | None, result: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if not base:
        return []
    after = {row["name"]: row for row in result or []}
    rows = []
    for row in base:
        merged = dict(row)
        other = after.get(row["name"])
        if other is not None:
            merged |= {
                "sparsity_after": other.get("sparsity"),
                "bits_after": other.get("bits"),
                "bytes_after": other.get("bytes"),
            }
        rows.append(merged)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _change(key: str, base: dict[str, Any], result: dict[str, Any]) -> str:
    a, b = base.get(key), result.get(key)
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return ""
    if key in ("size_bytes", "parameters", "nonzero_parameters"):
        return f"{a / b:.2f}x smaller" if b else ""
    return f"{b - a:+.4f}"
