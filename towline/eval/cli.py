"""``towline eval``, ``towline datasets`` and ``towline report``.

Each command is hooked into ``towline/cli.py`` with one line. ``towline eval`` reads method
options exactly as ``towline generate`` does (:func:`towline.cli.method_arguments`); with
several methods (``--method base-only,guide-only,nudging``) each gets the options it has, the
models included, so all three share the same loaded base and guide.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from towline.eval.datasets import SAMPLE_SEED, SOURCES, DatasetError
from towline.eval.summary import Summary
from towline.methods import OptionError, method_class
from towline.methods.base import Method
from towline.models.base import ModelError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(message: str) -> typing.NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(2)


def _takes(cls: type[Method], flag: str) -> bool:
    """Whether method ``cls`` has the option behind ``--flag`` (its own options, its roles'
    models, templates and sampling settings)."""
    from towline.cli import ROLE_SAMPLING

    name = flag[2:].replace("-", "_")
    types = typing.get_type_hints(cls)
    if name.startswith("no_") and types.get(name[3:]) is bool:
        return True
    roles = [r.name for r in cls.roles]
    role, _, setting = name.partition("_")
    return (name in {f.name for f in dataclasses.fields(cls)} or name in roles
            or (role in roles and setting in ("template", *ROLE_SAMPLING)))


def methods_arguments(names: list[str], args: list[str], shared: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The :func:`towline.compose` arguments of each method from one list of method flags:
    each method gets the flags it has; a flag no method has is an error.

    >>> kwargs = methods_arguments(["base-only", "nudging"], ["--gamma", "0.3", "--max-tokens", "64"], {})
    >>> kwargs["base-only"]["max_tokens"], kwargs["nudging"]["gamma"], "gamma" in kwargs["base-only"]
    (64, 0.3, False)
    """
    from towline.cli import method_arguments

    classes = [method_class(name) for name in names]
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    for group in groups:
        if not group[0].startswith("--") or not any(_takes(cls, group[0]) for cls in classes):
            method_arguments(classes[0], group, shared)  # raises the error that names the flag
    return {cls.name: method_arguments(cls, [a for g in groups if _takes(cls, g[0]) for a in g], shared)
            for cls in classes}


@contextmanager
def _progress(done: int, total: int) -> Iterator[Any]:
    """A progress bar with ETA on a terminal; one line per finished item otherwise (logs)."""
    if not err.is_terminal:
        count = [done]

        def log(record: dict[str, Any]) -> None:
            count[0] += 1
            seconds = (record.get("result") or {}).get("seconds", 0.0)
            err.print(f"[{count[0]}/{total}] {record['method']} {record['task']} {record['id']}: "
                      f"{_mark(record)} ({seconds:.1f}s)", markup=False)

        yield log
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}")]
    with Progress(*columns, console=err) as bar:
        task_id = bar.add_task("eval", total=total, completed=done, last="")
        yield lambda record: bar.update(task_id, advance=1,
                                        last=f"{record['method']} {record['task']}: {_mark(record)}")


def _mark(record: dict[str, Any]) -> str:
    if record.get("error"):
        return "skipped (" + record["error"][:60] + ")"
    if record.get("correct") is not None:
        return "right" if record["correct"] else "wrong"
    if record.get("score") is not None:
        return f"score {record['score']:.2f}"
    return "done"


def print_summary(summary: Summary, console: Console = out) -> None:
    table = Table(title=None if summary.complete else f"{summary.missing} items not finished",
                  show_header=True, header_style="bold")
    table.add_column("task")
    for label in summary.header():
        table.add_column(label, justify="right")
    for name, cells in summary.rows():
        table.add_row(name, *cells, end_section=name == summary.tasks[-1] if summary.tasks else False)
    for name, cells in summary.footer():
        table.add_row(Text(name, style="dim"), *[Text(c, style="dim") for c in cells])
    console.print(table)


def eval_command(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Data set name(s), comma-separated (see `towline datasets`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: results.jsonl, summary.json/.md, config.json.")],
    method: Annotated[str, typer.Option(help="Method name(s), comma-separated, e.g. base-only,guide-only,nudging.")]
    = "nudging",
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n",
                                                    help="Items per data set, drawn with --sample-seed (all if "
                                                         "more than the set holds).")] = 100,
    workers: Annotated[int, typer.Option(help="Items in flight at once (local models still serve one at a time).")]
    = 1,
    batch_size: Annotated[int, typer.Option(help="Items of one method answered together where the method can "
                                                 "(greedy base-only and guide-only: one batch through the model; "
                                                 "nudging on local weights: the answers' calls merged into "
                                                 "batched passes).")]
    = 8,
    resume: Annotated[bool, typer.Option(help="Finish the run in --out, skipping items already done.")] = False,
    source: Annotated[str, typer.Option(help=f"Where the data comes from: {' or '.join(SOURCES)} (Hugging Face).")]
    = "bundled",
    data: Annotated[Path | None, typer.Option(help="A JSONL file of the same schema instead (one --dataset).")]
    = None,
    sample_seed: Annotated[int, typer.Option(help="Seed that draws the items (the paper's: 609).")] = SAMPLE_SEED,
    judge: Annotated[str | None, typer.Option(help="LLM judge: openai:MODEL@URL (any OpenAI-compatible chat "
                                                   "endpoint).")] = None,
    system: Annotated[str | None, typer.Option(help="System text instead of the task's.")] = None,
    question_prefix: Annotated[str | None, typer.Option(help="Question prefix instead of the task's.")] = None,
    context: Annotated[str | None, typer.Option(help="Context instead of the task's (MMLU: the subject).")] = None,
    answer_start: Annotated[str | None, typer.Option(help="Answer start instead of the task's.")] = None,
    temperature: Annotated[float, typer.Option(help="Every model's temperature (0 = greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Every model's nucleus size.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Every model's top-k (0 = off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (makes sampled runs repeatable).")] = None,
) -> None:
    """Evaluate methods on the papers' tasks; resumable, one JSON line per finished item.

    Method options follow the method names, as in `towline generate` (--base, --guide,
    --gamma, --max-tokens, ...; see `towline methods`).
    """
    from towline.cli import _quiet_libraries
    from towline.eval.runner import EvalConfig, RunError, evaluate

    try:
        names = [m.strip() for m in method.split(",") if m.strip()]
        if len(set(names)) != len(names):
            raise OptionError("method", f"a method is named twice in {method!r}")
        shared = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        methods = methods_arguments(names, ctx.args, shared)
        config = EvalConfig(
            datasets=tuple(d.strip() for d in dataset.split(",") if d.strip()), methods=methods,
            num_samples=num_samples, sample_seed=sample_seed, source=source,
            data=str(data) if data else None, judge=judge,
            prompt={"system": system, "question_prefix": question_prefix, "context": context,
                    "answer_start": answer_start})
        _quiet_libraries()
        summary = evaluate(config, out_dir, workers=workers, batch_size=batch_size, resume=resume,
                           progress=_progress)
    except KeyboardInterrupt:
        err.print(f"interrupted: the finished items are saved in {out_dir}; add --resume to go on", markup=False)
        # Every finished item is already fsynced; do not wait for the items in flight.
        os._exit(130)
    except OptionError as error:
        from towline.cli import flag

        _fail(f"{flag(error.option)}: {error.problem}")
    except (RunError, DatasetError, ModelError, ValueError) as error:
        _fail(str(error))
    print_summary(summary)
    err.print(f"results: {out_dir / 'results.jsonl'}; summary: {out_dir / 'summary.md'}", markup=False)


def datasets_command() -> None:
    """List the evaluation data sets: rows, task, how answers are scored, where they come from."""
    from towline.eval.datasets import HUB, load
    from towline.eval.tasks import TASKS

    table = Table("name", "rows", "task; answer", "scored by", "Hugging Face original (--source hub)")
    for name, the_task in TASKS.items():
        scoring = [s for s, used in (("rule", the_task.checker is not None),
                                     (f"judge: {the_task.judge}", the_task.judge != "none")) if used]
        hub = HUB[name]
        table.add_row(name, str(len(load(name))), the_task.description, ", ".join(scoring),
                      " ".join(p for p in (hub.path, hub.name, hub.split) if p))
    out.print(table)
    out.print("Bundled copies: towline/eval/data/NAME.jsonl.gz; where each came from: towline/eval/data/SOURCES.md.")


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `towline eval`.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write report.html (and gamma.png); "
                                                               "default: the first run folder.")] = None,
    recheck: Annotated[bool, typer.Option(help="Score the stored answers again with today's answer checkers.")]
    = False,
) -> None:
    """Compare runs side by side (the paper's table), write an HTML page with every answer and,
    when runs differ in gamma, a plot of accuracy and guide share against gamma."""
    from towline.eval.report import ReportError, build_report

    try:
        report = build_report(runs, out_dir or runs[0], recheck=recheck)
    except (ReportError, DatasetError) as error:
        _fail(str(error))
    print_summary(report.summary)
    err.print(f"HTML: {report.html}", markup=False)
    if report.plot:
        err.print(f"plot: {report.plot}", markup=False)
