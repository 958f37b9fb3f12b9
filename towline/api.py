"""The Python API: :func:`generate` answers one prompt; :func:`compose` binds a method to open
models and answers many (the evaluation runner and the server use it).

Keyword arguments are read against the method (``towline methods`` lists them): a role name
(``base=``, ``guide=``, ...) is that role's model, a spec string or an open
:class:`~towline.models.base.Model`; ``ROLE_sampling=`` / ``ROLE_template=`` set how that
model samples and which template builds its prompt (``sampling=`` applies to every role);
every other keyword is a method option. Everything is checked before any model loads:

>>> import towline
>>> towline.generate(method="nudging", prompt="Hi", gamma=2.0)
Traceback (most recent call last):
towline.methods.base.OptionError: gamma: must be between 0 and 1, got 2.0
>>> towline.generate(method="nudging", prompt="Hi", gama=0.3)
Traceback (most recent call last):
towline.methods.base.OptionError: gama: not an option of method 'nudging' (did you mean gamma?)

>>> result = towline.generate(method="nudging", base="gemma-3-270m",      # doctest: +SKIP
...                           guide="smollm2-135m-instruct", prompt="What is 12 + 30?")
>>> result.text, result.guide_token_fraction                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from towline.methods import METHODS, Method, OptionError, Participant, Result, method_class
from towline.methods.base import OnText
from towline.models import load_model
from towline.models.base import GREEDY, Model, Sampling
from towline.prompts import PromptRequest, check_template

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed")


class Aligned:
    """A method bound to open models: answers many prompts with the models loaded once.

    Models opened here from spec strings are closed by :meth:`close` (or leaving a ``with``
    block); models passed in open are left open.
    """

    def __init__(self, method: Method, participants: dict[str, Participant], stack: ExitStack) -> None:
        self.method = method
        self.participants = participants
        self._stack = stack

    def generate(self, prompt: str | PromptRequest, *, on_text: OnText | None = None) -> Result:
        return self.method.run(as_request(prompt), self.participants, on_text=on_text)

    def generate_batch(self, prompts: Sequence[str | PromptRequest]) -> list[Result]:
        """Answer several prompts, decoded together where the method can (see
        :meth:`Method.run_batch`)."""
        return self.method.run_batch([as_request(p) for p in prompts], self.participants)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Aligned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compose(*, method: str = "nudging", **kwargs: Any) -> Aligned:
    """Check every argument, then open the models of ``method`` (see the module docstring)."""
    cls = method_class(method)
    method_options, models, samplings, templates = split_arguments(cls, kwargs)
    instance = cls(**method_options)
    chosen = {role.name: models.get(role.name, role.default) for role in cls.roles}
    for role in cls.roles:
        if chosen[role.name] is None and role.required:
            raise OptionError(role.name, f"method {method!r} needs a {role.name} model")
    instance.check_roles([name for name, model in chosen.items() if model is not None])
    stack = ExitStack()
    participants = {}
    opened: dict[str, Model] = {}  # a spec given for several roles is loaded once
    try:
        for role in cls.roles:
            model = chosen[role.name]
            if isinstance(model, str):
                if model not in opened:
                    opened[model] = stack.enter_context(load_model(model))
                model = opened[model]
            if model is not None:
                participants[role.name] = Participant(model, samplings[role.name], templates.get(role.name))
        stack.enter_context(instance)
    except BaseException:
        stack.close()
        raise
    return Aligned(instance, participants, stack)


def generate(*, method: str = "nudging", prompt: str | PromptRequest, on_text: OnText | None = None,
             **kwargs: Any) -> Result:
    """Answer ``prompt`` (the question, or a full :class:`PromptRequest`) with one method."""
    request = as_request(prompt)
    with compose(method=method, **kwargs) as aligned:
        return aligned.generate(request, on_text=on_text)


def as_request(prompt: str | PromptRequest) -> PromptRequest:
    if isinstance(prompt, PromptRequest):
        return prompt
    if not isinstance(prompt, str):
        raise OptionError("prompt", f"must be a string or a PromptRequest, got {type(prompt).__name__}")
    return PromptRequest(question=prompt)


def split_arguments(cls: type[Method], kwargs: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Sampling], dict[str, str | None]]:
    """Sort keyword arguments into method options, models, samplings and templates per role,
    checking each (the templates compile; the samplings are valid)."""
    roles = [r.name for r in cls.roles]
    fields = {f.name for f in dataclasses.fields(cls)}
    shared = kwargs.get("sampling", GREEDY)
    options, models, samplings, templates = {}, {}, {}, {}
    for key, value in kwargs.items():
        if key in fields:
            options[key] = value
        elif key in roles:
            if not isinstance(value, (str, Model)):
                raise OptionError(key, f"must be a model spec string or an open Model, got {value!r}")
            models[key] = value
        elif key.endswith("_template") and key.removesuffix("_template") in roles:
            if value is not None:
                try:
                    check_template(value)
                except ValueError as error:
                    raise OptionError(key, str(error)) from None
            templates[key.removesuffix("_template")] = value
        elif key == "sampling" or (key.endswith("_sampling") and key.removesuffix("_sampling") in roles):
            if not isinstance(value, Sampling):
                raise OptionError(key, f"must be a towline.Sampling, got {value!r}")
        else:
            known = sorted(fields | set(roles) | {f"{r}_{s}" for r in roles for s in ("sampling", "template")})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; options: {', '.join(known)}"
            raise OptionError(key, f"not an option of method {cls.name!r}{hint}")
    for role in roles:
        samplings[role] = kwargs.get(f"{role}_sampling", shared)
    return options, models, samplings, templates


def parse_option(cls: type[Method], name: str, text: str) -> Any:
    """Read a method option given as text (the CLI, the server's ``--compose``) by its type.

    >>> from towline.methods import METHODS
    >>> parse_option(METHODS["nudging"], "gamma", "0.3"), parse_option(METHODS["nudging"], "max_rounds", "9")
    (0.3, 9)
    >>> parse_option(METHODS["nudging"], "gamma", "high")
    Traceback (most recent call last):
    towline.methods.base.OptionError: gamma: must be a number, got 'high'
    """
    annotation = typing.get_type_hints(cls)[name]
    kinds = [k for k in (typing.get_args(annotation) or (annotation,)) if k is not type(None)]
    if text.lower() == "none" and len(kinds) < len(typing.get_args(annotation) or (annotation,)):
        return None
    kind = kinds[0]
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return [_parse_scalar(name, item, part.strip()) for part in text.split(",")]
    return _parse_scalar(name, kind, text)


def _parse_scalar(name: str, kind: Any, text: str) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(name, f"must be true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise OptionError(name, f"must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    return text


__all__ = ["METHODS", "Aligned", "compose", "generate", "parse_option"]
