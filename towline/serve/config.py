"""What to serve: models by spec, composites by method and options, from the command line
(``--model``, ``--compose``) or a TOML file (``--config``). Everything is checked before
any model loads; then each model loads once, whether it is served as itself, takes a role
in composites, or both.

>>> parse_compose("aligned=nudging(base=gemma-3-270m, guide=smollm2-135m-instruct, gamma=0.4)")
('aligned', 'nudging', {'base': 'gemma-3-270m', 'guide': 'smollm2-135m-instruct', 'gamma': '0.4'})
>>> parse_compose("x=nudging(guide='openai:smol@http://a/v1,http://b/v1', gamma=0.3)")[2]["guide"]
'openai:smol@http://a/v1,http://b/v1'
>>> parse_model("smol=/models/SmolLM2.gguf"), parse_model("gemma-3-270m")
(('smol', '/models/SmolLM2.gguf'), ('gemma-3-270m', 'gemma-3-270m'))

A TOML file holds the same (``models``: a list of specs, or a table of name = spec)::

    models = ["smollm2-135m-instruct", "gemma-3-270m"]

    [compose.aligned]
    method = "nudging"
    base = "gemma-3-270m"
    guide = "smollm2-135m-instruct"
    gamma = 0.4
"""

from __future__ import annotations

import re
import tomllib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from towline.api import Aligned, compose, split_arguments
from towline.methods import OptionError, method_class
from towline.models import OPENAI_PREFIX, load_model
from towline.models.base import Model
from towline.models.local import LocalModel

SHARED_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "seed": int}
"""Composite options that set every role's sampling (``ROLE_temperature`` etc. set one)."""

_COMPOSE = re.compile(r"\s*([\w.-]+)\s*=\s*([\w.-]+)\s*(?:\((.*)\))?\s*", re.DOTALL)


class ConfigError(ValueError):
    """Something to serve is written wrongly; the message says where and how to fix it."""


@dataclass
class ServeConfig:
    models: dict[str, str] = field(default_factory=dict)
    """Served name -> model spec."""
    composites: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    """Served name -> (method, {option: value as text})."""

    def add_model(self, name: str, spec: str, where: str) -> None:
        if spec.startswith(OPENAI_PREFIX):
            raise ConfigError(f"{where}: {spec!r} is a model behind another server; towline serve serves local "
                              "weights as themselves (use it as a role in a composite instead)")
        self._new_name(name, where)
        self.models[name] = spec

    def add_composite(self, name: str, method: str, options: dict[str, str], where: str) -> None:
        self._new_name(name, where)
        self.composites[name] = (method, options)

    def _new_name(self, name: str, where: str) -> None:
        if name in self.models or name in self.composites:
            raise ConfigError(f"{where}: the name {name!r} is served twice: give each model a name of its own "
                              "(--model NAME=SPEC)")


def parse_model(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` or ``SPEC`` (served under the spec itself)."""
    name, sep, spec = text.partition("=")
    if sep and re.fullmatch(r"[\w.-]+", name.strip()) and spec.strip() and not text.startswith(OPENAI_PREFIX):
        return name.strip(), spec.strip()
    return text.strip(), text.strip()


def parse_compose(text: str) -> tuple[str, str, dict[str, str]]:
    """``NAME=METHOD(key=value, ...)``: quote a value that holds a comma or a parenthesis."""
    match = _COMPOSE.fullmatch(text)
    if not match:
        raise ConfigError(f"--compose {text!r}: write NAME=METHOD(key=value, ...), e.g. "
                          "aligned=nudging(base=gemma-3-270m, guide=smollm2-135m-instruct, gamma=0.4)")
    name, method, body = match.groups()
    options: dict[str, str] = {}
    for part in _split_top_level(body or "", text):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"\w+", key):
            raise ConfigError(f"--compose {text!r}: {part.strip()!r} is not key=value")
        if key in options:
            raise ConfigError(f"--compose {text!r}: {key} is given twice")
        options[key] = _unquote(value.strip())
    return name, method, options


def _split_top_level(body: str, text: str) -> list[str]:
    parts, current, quote = [], [], ""
    for char in body:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote:
        raise ConfigError(f"--compose {text!r}: a quote is not closed")
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def read_config(path: Path, config: ServeConfig) -> None:
    """Add the models and composites of a TOML file to ``config``."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML ({error})") from None
    if unknown := sorted(set(data) - {"models", "compose"}):
        raise ConfigError(f"--config {path}: unknown section(s) {', '.join(unknown)}; the file holds `models` "
                          "(a list of specs, or a table name = spec) and `[compose.NAME]` tables")
    models = data.get("models", [])
    if isinstance(models, list) and all(isinstance(m, str) for m in models):
        models = {m: m for m in models}
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise ConfigError(f"--config {path}: models must be a list of model specs or a table of name = \"spec\"")
    for name, spec in models.items():
        config.add_model(name, spec, f"--config {path}")
    composites = data.get("compose", {})
    if not isinstance(composites, dict):
        raise ConfigError(f"--config {path}: compose must be tables, [compose.NAME]")
    for name, table in composites.items():
        where = f"--config {path} [compose.{name}]"
        if not isinstance(table, dict) or not isinstance(table.get("method"), str):
            raise ConfigError(f"{where}: give the method, e.g. method = \"nudging\"")
        options = {k: _toml_text(v, f"{where} {k}") for k, v in table.items() if k != "method"}
        config.add_composite(name, table["method"], options, where)


def _toml_text(value: Any, where: str) -> str:
    """A TOML value as the text the command line would give (one way to read options)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    raise ConfigError(f"{where}: must be a number, a string, true/false or a list of them, got {value!r}")


def composite_arguments(name: str, method: str, options: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments of :func:`towline.compose` for one composite, each text value
    read by the method's option types (the same reading as ``towline generate``'s flags)."""
    from towline.cli import method_arguments

    where = f"composite {name!r}"
    try:
        cls = method_class(method)
        shared = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
        rest = []
        for key, value in options.items():
            if key in SHARED_SAMPLING:
                try:
                    shared[key] = SHARED_SAMPLING[key](value)
                except ValueError:
                    raise OptionError(key, f"must be a number, got {value!r}") from None
            else:
                rest += [f"--{key.replace('_', '-')}", value]
        kwargs = method_arguments(cls, rest, shared)
        split_arguments(cls, kwargs)  # templates compile, samplings are valid
        cls(**{k: v for k, v in kwargs.items() if k in {f.name for f in cls.options()}})
    except OptionError as error:
        raise ConfigError(f"{where}: {error.option}: {error.problem}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    return kwargs


@dataclass
class Opened:
    """The open models and composites, ready for :func:`towline.serve.create_app`."""

    models: dict[str, LocalModel]
    composites: dict[str, Aligned]
    stack: ExitStack

    def close(self) -> None:
        self.stack.close()


def open_all(config: ServeConfig, *, log=lambda message: None) -> Opened:
    """Check every composite, then load each model once and compose the composites."""
    if not config.models and not config.composites:
        raise ConfigError("nothing to serve: give --model SPEC, --compose NAME=METHOD(...) or --config FILE")
    arguments = {name: (method, composite_arguments(name, method, options))
                 for name, (method, options) in config.composites.items()}
    stack = ExitStack()
    try:
        by_spec: dict[str, Model] = {}

        def load(spec: str) -> Model:
            if spec not in by_spec:
                log(f"loading {spec}")
                by_spec[spec] = stack.enter_context(load_model(spec))
            return by_spec[spec]

        models = {name: load(spec) for name, spec in config.models.items()}
        composites = {}
        for name, (method, kwargs) in arguments.items():
            for role in method_class(method).roles:
                spec = kwargs.get(role.name, role.default)
                if spec is None:  # an optional role left out
                    continue
                # A role naming a served model (by its name or its spec) shares that model.
                kwargs[role.name] = models[spec] if spec in models else load(spec)
            composites[name] = stack.enter_context(compose(method=method, **kwargs))
    except BaseException:
        stack.close()
        raise
    return Opened(models, composites, stack)


__all__ = ["ConfigError", "Opened", "ServeConfig", "open_all", "parse_compose", "parse_model", "read_config"]
