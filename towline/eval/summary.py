"""Summaries of evaluation results: per method and task, accuracy (or judge score), the guide's
share of the output, model calls, tokens and seconds; and the paper's table layout (rows:
tasks and their average; columns: base only, guide only, nudging, other methods).

>>> records = [
...     {"method": "nudging", "task": "gsm8k", "id": "1", "correct": True, "score": None, "rule": None,
...      "judge": None, "error": None, "result": {"tokens": 10, "guide_token_fraction": 0.2, "seconds": 1.0,
...      "model_calls": {"base": 3, "guide": 2}, "stop_reason": "guide_stop"}},
...     {"method": "nudging", "task": "gsm8k", "id": "2", "correct": False, "score": None, "rule": None,
...      "judge": None, "error": None, "result": {"tokens": 30, "guide_token_fraction": 0.1, "seconds": 2.0,
...      "model_calls": {"base": 5, "guide": 4}, "stop_reason": "length"}}]
>>> s = summarize({"methods": {"nudging": {}}}, records)
>>> cell = s.cells["nudging"]["gsm8k"]
>>> cell["accuracy"], round(cell["guide_share"], 3), cell["model_calls"], cell["tokens"]
(0.5, 0.15, {'base': 8, 'guide': 6}, 40)
>>> print(s.markdown().splitlines()[2])
| gsm8k | 50.0 |
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towline.files import write_atomic
from towline.methods import METHODS


def method_rank(name: str) -> tuple[int, int]:
    """Where a method's column goes in the paper's layout: one-model baselines first (base
    only, then guide only), then the methods that combine models, each group in registry
    order; unknown names last."""
    cls = METHODS.get(name)
    if cls is None:
        return (99, 0)
    return (len(cls.roles), list(METHODS).index(name))


def column_order(methods: list[str]) -> list[str]:
    """Methods in the paper's column order (:func:`method_rank`).

    >>> column_order(["nudging", "guide-only", "base-only"])
    ['base-only', 'guide-only', 'nudging']
    """
    return sorted(methods, key=method_rank)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass
class Summary:
    """``cells[method][task]`` holds one method's figures on one task (see :func:`summarize`);
    ``average[method]`` the mean of its task accuracies and scores."""

    config: dict[str, Any]
    cells: dict[str, dict[str, dict[str, Any]]]
    average: dict[str, dict[str, Any]]
    tasks: list[str]
    methods: list[str]
    complete: bool = True
    seconds: float | None = None
    missing: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "complete": self.complete, "missing": self.missing,
                "run_seconds": self.seconds, "tasks": self.tasks, "methods": self.methods,
                "cells": self.cells, "average": self.average}

    def rows(self) -> list[tuple[str, list[str]]]:
        """The table as text: one row per task and the average; one column per method. A task
        scored by accuracy shows percent correct; a judged task its mean score (1-5)."""
        out = []
        for name in self.tasks:
            out.append((name, [_cell_text(self.cells.get(m, {}).get(name)) for m in self.methods]))
        out.append(("average", [_cell_text(self.average.get(m)) for m in self.methods]))
        return out

    def footer(self) -> list[tuple[str, list[str]]]:
        """Rows under the table: guide share, model calls, tokens and seconds per method."""
        def total(method: str, key: str) -> list[Any]:
            return [c[key] for c in self.cells.get(method, {}).values() if c.get(key) is not None]

        rows = []
        shares = [self.average.get(m, {}).get("guide_share") for m in self.methods]
        if any(s is not None for s in shares):
            rows.append(("guide share", [f"{s:.1%}" if s is not None else "" for s in shares]))
        rows.append(("items", [str(sum(total(m, "n"))) for m in self.methods]))
        rows.append(("model calls", [str(sum(sum(c.values()) for c in total(m, "model_calls")))
                                     for m in self.methods]))
        rows.append(("tokens", [str(sum(total(m, "tokens"))) for m in self.methods]))
        rows.append(("seconds", [f"{sum(total(m, 'seconds')):.0f}" for m in self.methods]))
        agreement = [self.average.get(m, {}).get("agreement") for m in self.methods]
        if any(a is not None for a in agreement):
            rows.append(("rule = judge", [f"{a:.0%}" if a is not None else "" for a in agreement]))
        return rows

    def header(self) -> list[str]:
        return [self.labels.get(m, m) for m in self.methods]

    def markdown(self) -> str:
        head = ["task", *self.header()]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in self.rows()]
        footer = self.footer()
        if len(self.cells) and footer:
            lines += ["| " + " | ".join([f"*{name}*", *cells]) + " |" for name, cells in footer]
        return "\n".join(lines) + "\n"

    def save(self, folder: Path) -> None:

        write_atomic(folder / "summary.json", json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        note = "" if self.complete else f"\n{self.missing} items are not finished yet: rerun with --resume.\n"
        legend = ("\nCells: percent correct (items checked) for tasks with a right answer; the judge's mean "
                  "score (1-5) for judged tasks.\n")
        write_atomic(folder / "summary.md", self.markdown() + legend + note)


def _cell_text(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "—"
    if cell.get("accuracy") is not None:
        return f"{100 * cell['accuracy']:.1f}"
    if cell.get("score") is not None:
        return f"{cell['score']:.2f}"
    return "—"


def summarize(config: dict[str, Any], records: list[dict[str, Any]], *, jobs: list[tuple[str, str, str]] | None = None,
              seconds: float | None = None) -> Summary:
    """Figures per (method, task) from result records: ``n`` items; ``accuracy`` (share
    correct among items with a verdict); ``score`` (mean judge or sentiment score);
    ``judge_accuracy``, ``judge_unparsed`` and ``agreement`` (rule and judge verdicts equal)
    where a judge ran; ``guide_share`` (mean per-item share of output tokens from the guide,
    where the method reports one); ``model_calls``, ``tokens``, ``seconds``, ``stop_reasons``,
    ``errors``. ``average[method]`` holds the mean over tasks of each rate."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        grouped[record["method"]][record["task"]].append(record)
    methods = column_order(list(dict.fromkeys([*config.get("methods", {}), *grouped])))
    tasks = list(dict.fromkeys([*config.get("datasets", []), *(r["task"] for r in records)]))
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    average: dict[str, dict[str, Any]] = {}
    for method in methods:
        cells[method] = {name: _cell(items) for name, items in grouped[method].items()}
        average[method] = {key: _mean([c[key] for c in cells[method].values() if c.get(key) is not None])
                           for key in ("accuracy", "score", "judge_accuracy", "agreement", "guide_share")}
    done = {(r["method"], r["task"], r["id"]) for r in records}
    missing = len([key for key in jobs if key not in done]) if jobs is not None else 0
    return Summary(config, cells, average, tasks, methods, complete=missing == 0, seconds=seconds, missing=missing)


def _cell(items: list[dict[str, Any]]) -> dict[str, Any]:
    verdicts = [r["correct"] for r in items if r.get("correct") is not None]
    results = [r["result"] for r in items if r.get("result")]
    judged = [r["judge"] for r in items if r.get("judge")]
    judge_verdicts = [j["correct"] for j in judged if j.get("correct") is not None]
    pairs = [(r["rule"]["correct"], r["judge"]["correct"]) for r in items
             if r.get("rule") and r.get("judge") and r["judge"].get("correct") is not None]
    scores = [r["score"] for r in items if r.get("score") is not None]
    calls: Counter = Counter()
    for result in results:
        calls.update(result.get("model_calls", {}))
    shares = [r["guide_token_fraction"] for r in results if r.get("guide_token_fraction") is not None]
    return {
        "n": len(items),
        "correct": sum(verdicts),
        "accuracy": _mean([float(v) for v in verdicts]),
        "score": _mean(scores),
        "judge_accuracy": _mean([float(v) for v in judge_verdicts]),
        "judge_unparsed": sum(1 for j in judged if not j.get("parsed")),
        "agreement": _mean([float(a == b) for a, b in pairs]),
        "guide_share": _mean(shares),
        "model_calls": dict(calls),
        "tokens": sum(r.get("tokens", 0) for r in results),
        "seconds": sum(r.get("seconds", 0.0) for r in results),
        "stop_reasons": dict(Counter(r.get("stop_reason") for r in results)),
        "errors": sum(1 for r in items if r.get("error")),
    }
