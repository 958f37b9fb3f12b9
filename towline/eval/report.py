"""``towline report``: runs side by side in the paper's layout, one self-contained HTML page
with every answer, and a plot of accuracy and guide share against gamma.

Each (run folder, method) is one column; runs of one method with the same options over
different items (a task list split in two) join into one. Columns of the same method are told
apart by the options in which they differ (``nudging gamma=0.3``), or else by their folder's name.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towline.eval.datasets import load
from towline.eval.runner import CONFIG_FILE, RESULTS_FILE, read_results, score_record
from towline.eval.summary import Summary, method_rank, summarize
from towline.eval.tasks import task
from towline.files import write_atomic

HTML_FILE = "report.html"
PLOT_FILE = "gamma.png"
SWEPT_OPTION = "gamma"


class ReportError(ValueError):
    """A run folder cannot be read; the message says what to do."""


@dataclass
class Column:
    run: Path
    method: str
    options: dict[str, Any]
    records: list[dict[str, Any]]
    label: str = ""
    runs: list[Path] = field(default_factory=list)
    """Every run folder the column's records come from."""


@dataclass
class Report:
    summary: Summary
    columns: list[Column]
    html: Path
    plot: Path | None


def load_columns(runs: list[Path], *, recheck: bool = False) -> tuple[list[Column], list[str]]:
    """One column per (run, method), labelled, in the paper's order; and every task, in the
    order the runs name them. ``recheck`` scores the stored answers again with today's
    checkers (the runs' own data and prompt prefix)."""
    columns, tasks = [], []
    for run in runs:
        config_path = run / CONFIG_FILE
        if not config_path.exists():
            raise ReportError(f"{run} is not a towline eval run folder (no {CONFIG_FILE})")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        records = read_results(run / RESULTS_FILE)
        if recheck:
            records = _recheck(records, config)
        tasks += [t for t in config["datasets"] if t not in tasks]
        for method, options in config["methods"].items():
            columns.append(Column(run, method, options, [r for r in records if r["method"] == method]))
    columns = _join_shards(columns)
    _label(columns)
    columns.sort(key=lambda c: (method_rank(c.method), _number(c.options.get(SWEPT_OPTION)), c.label))
    return columns, tasks


def _join_shards(columns: list[Column]) -> list[Column]:
    """One column for runs of one method with the same options over different items (a long
    evaluation split into several runs, say a task list in two halves run side by side)."""
    joined: list[Column] = []
    for column in columns:
        items = {(r["task"], r["id"]) for r in column.records}
        same = next((c for c in joined if c.method == column.method
                     and json.dumps(c.options, sort_keys=True) == json.dumps(column.options, sort_keys=True)
                     and not items & {(r["task"], r["id"]) for r in c.records}), None)
        if same is None:
            joined.append(Column(column.run, column.method, column.options, list(column.records),
                                 runs=[column.run]))
        else:
            same.records += column.records
            same.runs.append(column.run)
    return joined


def _recheck(records: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name in config["datasets"]:
        rows[name] = {r["id"]: r for r in load(name, source=config["source"], data=config["data"])}
    overrides = {k: v for k, v in config["prompt"].items() if v is not None}
    return [score_record(r, task(r["task"]), row, task(r["task"]).request(row, **overrides))
            for r in records for row in [rows[r["task"]][r["id"]]]]


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else float("-inf")


def _label(columns: list[Column]) -> None:
    by_method: dict[str, list[Column]] = defaultdict(list)
    for column in columns:
        by_method[column.method].append(column)
    for method, group in by_method.items():
        keys = sorted({k for c in group for k in c.options})
        differing = [k for k in keys if len({json.dumps(c.options.get(k), sort_keys=True) for c in group}) > 1]
        for column in group:
            parts = [f"{k}={_short(column.options.get(k))}" for k in differing]
            column.label = f"{method} {' '.join(parts)}" if parts else method
        seen: dict[str, int] = defaultdict(int)
        for column in group:
            seen[column.label] += 1
        for column in group:
            if seen[column.label] > 1:
                column.label = f"{column.label} ({column.run.name})"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if v not in (None, 0, 0.0, 1.0))
    return str(value)


def build_report(runs: list[Path], out: Path, *, recheck: bool = False) -> Report:
    """Read the runs, write ``report.html`` (and ``gamma.png`` for a gamma sweep) into ``out``."""
    if not runs:
        raise ReportError("name at least one run folder")
    columns, tasks = load_columns(runs, recheck=recheck)
    records = [dict(r, method=c.label) for c in columns for r in c.records]
    summary = summarize({"datasets": tasks, "methods": {c.label: {} for c in columns}}, records)
    summary.methods = [c.label for c in columns]
    out.mkdir(parents=True, exist_ok=True)
    page = out / HTML_FILE
    write_atomic(page, render_html(summary, columns, tasks))
    plot = plot_gamma(summary, columns, out / PLOT_FILE)
    return Report(summary, columns, page, plot)


# -- the plot ------------------------------------------------------------------------------

def plot_gamma(summary: Summary, columns: list[Column], path: Path) -> Path | None:
    """Average accuracy and guide share against gamma, one line per method swept; None
    (and no file) when no method was run at two or more gammas."""
    sweeps: dict[str, list[Column]] = defaultdict(list)
    for column in columns:
        if isinstance(column.options.get(SWEPT_OPTION), (int, float)):
            sweeps[column.method].append(column)
    sweeps = {m: cs for m, cs in sweeps.items() if len({c.options[SWEPT_OPTION] for c in cs}) > 1}
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, group in sweeps.items():
        group = sorted(group, key=lambda c: c.options[SWEPT_OPTION])
        gammas = [c.options[SWEPT_OPTION] for c in group]
        accuracy = [summary.average[c.label].get("accuracy") for c in group]
        share = [summary.average[c.label].get("guide_share") for c in group]
        left.plot(gammas, [100 * a if a is not None else float("nan") for a in accuracy], "o-", label=method)
        right.plot(gammas, [100 * s if s is not None else float("nan") for s in share], "o-", label=method)
    for axis, title in ((left, "average accuracy (%)"), (right, "guide share of output tokens (%)")):
        axis.set_ylim(-2, 102)
        axis.set_xlabel("γ (gamma)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temp = path.with_suffix(".tmp.png")
    figure.savefig(temp, dpi=120)
    plt.close(figure)
    temp.replace(path)
    return path


# -- the HTML page -------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 110em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 2em; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
tr.average td { font-weight: bold; border-top: 2px solid #888; }
tr.footer td { color: #666; }
details { border: 1px solid #ddd; border-radius: 4px; margin: 0.4em 0; padding: 0.3em 0.6em; }
summary { cursor: pointer; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(22em, 1fr)); gap: 0.8em; }
.answer { border-left: 4px solid #bbb; padding: 0.2em 0.6em; }
.answer.right { border-color: #2a2; } .answer.wrong { border-color: #c33; }
pre { white-space: pre-wrap; word-wrap: break-word; font-family: inherit; margin: 0.3em 0; }
mark.guide { background: #f6d6ff; color: #6a1b9a; }
.ok { color: #2a2; font-weight: bold; } .bad { color: #c33; font-weight: bold; } .none { color: #999; }
.meta { color: #666; font-size: 0.9em; }
"""


def _mark(record: dict[str, Any] | None) -> str:
    if record is None:
        return '<span class="none">·</span>'
    if record.get("correct") is True:
        return '<span class="ok">✓</span>'
    if record.get("correct") is False:
        return '<span class="bad">✗</span>'
    if record.get("score") is not None:
        return f'<span class="meta">{record["score"]:.2f}</span>'
    return '<span class="none">?</span>'


def highlighted(result: dict[str, Any]) -> str:
    """The answer as HTML, the guide's words marked, where the result records its rounds
    (nudging); the plain answer otherwise.

    >>> highlighted({"text": "The answer is 4.", "rounds": [{"nudging_words": "The", "base_text": " answer"},
    ...                                                     {"nudging_words": " is", "base_text": " 4."}]})
    '<mark class="guide">The</mark> answer<mark class="guide"> is</mark> 4.'
    """
    text = result.get("text", "")
    rounds = result.get("rounds")
    pieces = []
    if isinstance(rounds, list) and all(isinstance(r, dict) and "nudging_words" in r for r in rounds):
        for r in rounds:
            pieces += [(r["nudging_words"], True), (r.get("base_text", ""), False)]
    if not pieces or not "".join(p for p, _ in pieces).startswith(text):
        return html.escape(text)
    out, left = [], len(text)  # the final clean-up may have cut a repeated tail: show only the text
    for piece, guide in pieces:
        piece = piece[:left]
        left -= len(piece)
        if piece:
            escaped = html.escape(piece)
            out.append(f'<mark class="guide">{escaped}</mark>' if guide else escaped)
    return "".join(out)


def _answer_html(column: Column, record: dict[str, Any] | None) -> str:
    title = f"<b>{html.escape(column.label)}</b> {_mark(record)}"
    if record is None:
        return f'<div class="answer">{title} <span class="meta">not run</span></div>'
    state = {True: "right", False: "wrong"}.get(record.get("correct"), "")
    lines = [f'<div class="answer {state}">{title}']
    if record.get("error"):
        lines.append(f'<div class="meta">skipped: {html.escape(record["error"])}</div>')
    else:
        result = record["result"]
        lines.append(f"<pre>{highlighted(result)}</pre>")
        meta = [f"stop: {html.escape(str(result.get('stop_reason')))}", f"{result.get('tokens')} tokens"]
        if result.get("guide_token_fraction") is not None:
            meta.append(f"guide {result['guide_token_fraction']:.0%}")
        if record.get("rule"):
            meta.append(f"read as: {html.escape(str(record['rule'].get('extracted')))}")
        judge = record.get("judge")
        if judge:
            verdict = judge.get("correct") if judge["kind"] == "correct" else judge.get("scores")
            meta.append(f"judge: {html.escape(json.dumps(verdict)) if judge.get('parsed') else 'unparseable'}")
        lines.append(f'<div class="meta">{" · ".join(meta)}</div>')
    lines.append("</div>")
    return "\n".join(lines)


def _summary_html(summary: Summary) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["task", *summary.header()])
    rows = []
    for name, cells in summary.rows():
        css = ' class="average"' if name == "average" else ""
        rows.append(f"<tr{css}><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    for name, cells in summary.footer():
        rows.append(f'<tr class="footer"><td>{html.escape(name)}</td>'
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f'<table class="summary"><tr>{head}</tr>{"".join(rows)}</table>'


def _gold_html(record: dict[str, Any]) -> str:
    answer, gold = str(record.get("answer", record["gold"])), str(record["gold"])
    shown = f"<div class='meta'>answer: <b>{html.escape(answer)}</b></div>"
    if gold != answer:
        shown += (f"<details class='meta'><summary>gold answer shown to a judge</summary>"
                  f"<pre>{html.escape(gold)}</pre></details>")
    return shown


def render_html(summary: Summary, columns: list[Column], tasks: list[str]) -> str:
    """One page, no outside files: the table, then every item of every task with each
    column's answer (guide words highlighted), what the checker read and the judge's verdict."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>towline report</title>"
             f"<style>{STYLE}</style></head><body><h1>towline report</h1>",
             "<p class='meta'>Runs: " + ", ".join(sorted({html.escape(str(r)) for c in columns for r in c.runs})) + "</p>",
             _summary_html(summary),
             "<p class='meta'>Cells: percent correct; for judged tasks the judge's mean score (1-5). "
             "<mark class='guide'>Marked text</mark> came from the guide.</p>"]
    for name in tasks:
        by_column = [{r["id"]: r for r in c.records if r["task"] == name} for c in columns]
        ids = sorted({i for found in by_column for i in found},
                     key=lambda i: min(found[i]["index"] for found in by_column if i in found))
        if not ids:
            continue
        parts.append(f"<h2>{html.escape(name)} <span class='meta'>({len(ids)} items)</span></h2>")
        for item in ids:
            first = next(found[item] for found in by_column if item in found)
            marks = " ".join(_mark(found.get(item)) for found in by_column)
            question = (first.get("context") or "") + first["question"]
            parts.append(f"<details><summary>{marks} <b>{html.escape(item)}</b> "
                         f"<span class='meta'>{html.escape(first['question'][:110])}</span></summary>"
                         f"<pre>{html.escape(question)}</pre>{_gold_html(first)}<div class='answers'>"
                         + "".join(_answer_html(c, found.get(item)) for c, found in zip(columns, by_column))
                         + "</div></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
