"""One shape for every method.

A method is a dataclass of its options that subclasses :class:`Method`, names the model
roles it needs (:class:`Role`) and implements :meth:`Method.run`. Registering it with
:func:`register` makes it known to ``towline.generate``, the CLI, the evaluation runner and
the server at once: adding a method is one new file plus one line in
``towline/methods/__init__.py``.

Every result extends :class:`Result`; :meth:`Result.to_dict` is derived from the fields and
public properties, so a new field shows in ``--json`` without being listed anywhere.

>>> from towline.methods import METHODS
>>> {"nudging", "base-only", "guide-only"} <= set(METHODS)
True
>>> METHODS["nudging"](gamma=1.5)
Traceback (most recent call last):
towline.methods.base.OptionError: gamma: must be between 0 and 1, got 1.5
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from towline.models.base import GREEDY, Model, ModelError, Sampling
from towline.prompts import FAMILIES, BuiltPrompt, PromptRequest, build_prompt

OnText = Callable[[str, str], None]
"""Called with each piece of output text as soon as it is final, and the role that wrote it
(``"base"``, ``"guide"``, ...): how the CLI shows an answer live and the server streams it."""

STOP_REASONS = ("end", "length", "guide_stop", "rounds", "repeated_nudging", "error")
"""``end``: the model ended its answer; ``length``: ``max_tokens``; ``guide_stop``: the
guide ended the answer (nudging); ``rounds``: ``max_rounds``; ``repeated_nudging``: the
same guide words four rounds running; ``error``: a model failed mid-answer (the partial
answer is kept and ``error`` says what happened)."""


class OptionError(ValueError):
    """A bad option value. ``option`` is its Python name; the CLI shows it as a flag.

    >>> str(OptionError("guide_template", "unknown template 'chatmll'"))
    "guide_template: unknown template 'chatmll'"
    """

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


class PromptTooLong(ModelError):
    """A prompt, with the room its answer needs, does not fit a model's context.

    :meth:`explain` words the message with the budget's name as the caller writes it (the CLI
    says ``--max-tokens``):

    >>> error = PromptTooLong(model="m", role="guide", context=8192, room=256, length=26000)
    >>> print(error.explain("--max-tokens"))
    the guide prompt is 26000 tokens and the answer may add 256 more (--max-tokens), but the guide model m has a context of 8192 tokens: shorten the prompt or lower --max-tokens
    """

    def __init__(self, *, model: str, role: str, context: int, room: int, length: int | None = None) -> None:
        self.model, self.role, self.context, self.room, self.length = model, role, context, room, length
        super().__init__(self.explain("max_tokens"))

    def explain(self, budget: str) -> str:
        where = f"the {self.role} model {self.model}"
        if self.length is None:
            return f"{budget} {self.room} does not fit {where}, whose context is {self.context} tokens: lower {budget}"
        return (f"the {self.role} prompt is {self.length} tokens and the answer may add {self.room} more "
                f"({budget}), but {where} has a context of {self.context} tokens: shorten the prompt "
                f"or lower {budget}")


def option(default: Any, help: str) -> Any:
    """A method option with its help text (shown by ``towline methods``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Role:
    """A model slot of a method: ``chat`` says whether its default prompt is the model's chat
    template (docs/prompts.md) or plain text; ``default`` is the model used when none is given. An
    optional role (``required=False``, no default) is simply left out when no model is given."""

    name: str
    chat: bool
    help: str
    default: str | None = None
    required: bool = True


BASE = Role("base", chat=False, help="The large model being steered (plain prompt).", default="gemma-3-270m")
GUIDE = Role("guide", chat=True, help="The small aligned chat model (chat prompt).", default="smollm2-135m-instruct")
"""The two roles most methods share, with the bundled default models."""


@dataclass(frozen=True)
class Participant:
    """An open model in one role, with how it samples and which template builds its prompt."""

    model: Model
    sampling: Sampling = GREEDY
    template: str | None = None

    def prompt(self, request: PromptRequest, *, chat: bool, room: int, role: str) -> BuiltPrompt:
        """This model's prompt for ``request``, checked against its context: the prompt and
        ``room`` more tokens (what the answer may add) must fit, else :class:`PromptTooLong`."""
        if chat and self.template is None and self.model.chat_template is None:
            raise OptionError(f"{role}_template", f"the {role} model {self.model.name} has no chat template "
                              f"of its own: name one ({', '.join(sorted(FAMILIES))}), 'plain' or a Jinja string")
        built = build_prompt(request, chat=chat, template=self.template, model_template=self.model.chat_template)
        check_fits(self.model, built.text, room=room, role=role)
        return built


def check_fits(model: Model, prompt: str, *, room: int, role: str) -> None:
    """Refuse, before any decoding, a prompt that leaves no room for ``room`` more tokens."""
    limit = model.context_length
    if limit is None:
        return
    if room >= limit:  # no prompt fits: refuse without counting a long prompt's tokens
        raise PromptTooLong(model=model.name, role=role, context=limit, room=room)
    length = model.count_tokens(prompt)
    if length + room > limit:
        raise PromptTooLong(model=model.name, role=role, context=limit, room=room, length=length)


@dataclass(kw_only=True)
class Result:
    """What every method returns. Subclasses add their own fields; ``to_dict`` has them all."""

    method: str
    text: str
    stop_reason: str
    """One of :data:`STOP_REASONS`."""
    tokens: int
    """Output length, in the (base) model's tokens."""
    model_calls: dict[str, int]
    seconds: float
    prompts: dict[str, str]
    templates: dict[str, str]
    error: str | None = None
    """What went wrong when ``stop_reason == "error"``."""

    def to_dict(self) -> dict[str, Any]:
        """Every field and public property, as JSON-ready values."""
        data = dataclasses.asdict(self)
        for name in dir(type(self)):
            if not name.startswith("_") and isinstance(getattr(type(self), name), property):
                data[name] = getattr(self, name)
        return data


@dataclass(kw_only=True)
class Method(ABC):
    """A decoding method: its options are the dataclass fields, checked on construction."""

    name: ClassVar[str]
    summary: ClassVar[str]
    roles: ClassVar[tuple[Role, ...]]

    max_tokens: int = option(256, "Output budget, in base tokens; never exceeded.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _option_types(type(self))[f.name])
        positive(self, "max_tokens")
        self.check()

    def check(self) -> None:
        """Range checks of the method's own options (raise :class:`OptionError`)."""

    def __enter__(self) -> Method:
        """Open what the method needs besides its roles' models (a search opens its scorer),
        once for many requests: :func:`towline.compose` enters the method and exits it when
        it closes. A method that was not entered opens and closes them in each :meth:`run`."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close what :meth:`__enter__` opened."""

    def check_roles(self, given: Collection[str]) -> None:
        """Checks that depend on which roles have a model (``given``: their names), made
        before any model loads; for methods with optional roles (raise :class:`OptionError`)."""

    @abstractmethod
    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> Result:
        """Answer one request with the open models, one per role."""

    @property
    def concurrent(self) -> bool:
        """Whether threads may run answers at once (where its models allow it): a method that
        keeps models or state of its own across answers says when they may not."""
        return True

    def run_batch(self, requests: Sequence[PromptRequest], models: Mapping[str, Participant]) -> list[Result]:
        """Answer several requests; a method that can decode them together (one batch through
        the model, much faster per answer on local weights) overrides this.

        Greedy answers are those of :meth:`run` up to near-ties (padding a batch moves logits
        in their last bits); a request that cannot be answered raises, as :meth:`run` does."""
        return [self.run(request, models) for request in requests]

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))


def positive(method: Method, *names: str) -> None:
    for name in names:
        if getattr(method, name) < 1:
            raise OptionError(name, f"must be at least 1, got {getattr(method, name)}")


def between(method: Method, name: str, low: float, high: float) -> None:
    value = getattr(method, name)
    if not low <= value <= high:
        raise OptionError(name, f"must be between {low:g} and {high:g}, got {value}")


METHODS: dict[str, type[Method]] = {}
"""Every registered method by name (``towline methods`` lists them)."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known by its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"two methods are named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The method registered under ``name``; an error listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError("method", f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None


def _option_types(cls: type[Method]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Refuse values of the wrong type, and non-finite floats, naming the option."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise OptionError(name, f"must be a finite number, got {value}")
            return
        if origin is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(kind) or (Any,)
            for element in value:
                _check_type(name, element, item)
            return
        if origin is Any or (isinstance(origin, type) and isinstance(value, origin)
                             and not (origin is int and isinstance(value, bool))):
            return
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise OptionError(name, f"must be {expected}, got {value!r}")


_UnionType = type(int | None)
