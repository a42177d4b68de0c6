"""Baseline vs result of a finished job, as a small table that prints in a terminal and renders in a notebook."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResultRow:
    metric: str
    baseline: float | None
    result: float | None
    baseline_text: str
    result_text: str
    ratio: float | None  # result / baseline, where both are known and the baseline is not zero

    @property
    def ratio_text(self) -> str:
        if self.ratio is None:
            return "—"
        return f"{self.ratio:.2f}x" if abs(self.ratio) >= 0.1 else f"{self.ratio:.2g}x"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: float) -> str:
    return f"{int(n):,}"


def _percent(x: float) -> str:
    return f"{x * 100:.2f} %"


def _fixed(x: float) -> str:
    return f"{x:.5f}"


def _ms(x: float) -> str:
    return f"{x:.3f} ms"


def _latency_p50(metrics: dict[str, Any]) -> float | None:
    latency = metrics.get("latency_ms")
    return latency.get("p50") if isinstance(latency, dict) else None


# (label, how to read the number from a metrics dict, how to show it)
_METRICS: list[tuple[str, Callable[[dict[str, Any]], Any], Callable[[float], str]]] = [
    ("size", lambda m: m.get("size_bytes"), _size),
    ("parameters", lambda m: m.get("parameters"), _count),
    ("nonzero parameters", lambda m: m.get("nonzero_parameters"), _count),
    ("sparsity", lambda m: m.get("sparsity"), _percent),
    ("accuracy", lambda m: m.get("accuracy"), _percent),
    ("agreement", lambda m: m.get("agreement"), _percent),
    ("cosine", lambda m: m.get("cosine"), _fixed),
    ("latency p50", _latency_p50, _ms),
]


class ResultTable:
    """What a job gained and lost: one row per metric, baseline, result and result/baseline.

    ``str(table)`` is a fixed-width text table; in Jupyter it renders as HTML (``_repr_html_``). ``rows`` holds the
    numbers, ``to_dict()`` a JSON-friendly form. Metrics a job could not measure (accuracy without labels) show "—".
    """

    def __init__(self, job_id: str, status: str, metrics: dict[str, Any] | None, *, title: str | None = None) -> None:
        self.job_id = job_id
        self.status = status
        metrics = metrics or {}
        baseline, result = metrics.get("baseline") or {}, metrics.get("result") or {}
        self.title = title or f"{job_id} ({status})"
        latency = result.get("latency_ms") or baseline.get("latency_ms") or {}
        self.batch_size = latency.get("batch_size") if isinstance(latency, dict) else None
        self.device = result.get("device") or baseline.get("device")
        self.rows: list[ResultRow] = []
        for label, read, show in _METRICS:
            b, r = read(baseline), read(result)
            if b is None and r is None:
                continue
            ratio = r / b if isinstance(b, int | float) and isinstance(r, int | float) and b != 0 else None
            self.rows.append(
                ResultRow(
                    metric=label,
                    baseline=b,
                    result=r,
                    baseline_text="—" if b is None else show(b),
                    result_text="—" if r is None else show(r),
                    ratio=ratio,
                )
            )

    @property
    def caption(self) -> str:
        parts = []
        if self.batch_size:
            parts.append(f"latency at batch size {int(self.batch_size)}")
        if self.device:
            parts.append(f"on {self.device}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "rows": [
                {"metric": r.metric, "baseline": r.baseline, "result": r.result, "ratio": r.ratio} for r in self.rows
            ],
        }

    def __str__(self) -> str:
        header = ("metric", "baseline", "result", "ratio")
        lines = [header, *((r.metric, r.baseline_text, r.result_text, r.ratio_text) for r in self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]

        def fmt(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        out = [self.title, fmt(header), "  ".join("-" * w for w in widths), *(fmt(line) for line in lines[1:])]
        if self.caption:
            out.append(f"({self.caption})")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<ResultTable {self.job_id} {self.status}: {len(self.rows)} metrics>"

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{h}</th>" for h in ("metric", "baseline", "result", "ratio"))
        body = "".join(
            f"<tr><td style='text-align:left'>{esc(r.metric)}</td><td>{esc(r.baseline_text)}</td>"
            f"<td>{esc(r.result_text)}</td><td>{esc(r.ratio_text)}</td></tr>"
            for r in self.rows
        )
        caption = esc(self.title) + (f"<br><small>{esc(self.caption)}</small>" if self.caption else "")
        return (
            f"<table style='text-align:right'><caption>{caption}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
