"""Scorers for weak-to-strong search: how good is a candidate answer, so far?

A :class:`Scorer` holds what scoring needs (its models, loaded once for many requests);
:meth:`Scorer.start` begins one request's scoring, a :class:`Scoring` whose rows follow the
search's candidates: :meth:`Scoring.score` takes every candidate's text so far and
:meth:`Scoring.reorder` follows the search's selection, so a scorer can keep per-candidate
state (a KV cache) and pay only for what a candidate added since it was last scored.

Three kinds, each written as a spec string (``--scorer`` on the command line):

- ``implicit:TUNED,UNTUNED`` -- :class:`ImplicitValue`, the paper's scorer:
  ``log p_tuned(y | prompt_tuned) - log p_untuned(y | prompt_untuned)``, each model on its
  own prompt (the tuned one its chat template, the untuned one a plain prompt, unless told
  otherwise) and its own tokenizer, so neither needs the base's vocabulary: responses are
  scored as text. TUNED and UNTUNED may be the same model on different prompts.
- ``reward:MODEL[@LABEL]`` -- :class:`RewardModel`, a transformers sequence-classification
  model (a local directory or a Hugging Face id); the score is its one output, or for a
  classifier the log-odds of LABEL (``logit[LABEL] - logsumexp(other logits)``; with two
  labels, their logit difference).
- ``function:MODULE:NAME`` -- :class:`FunctionScorer`, a Python function
  ``(prompt, response) -> float``.

>>> parse_scorer("implicit:smollm2-135m-instruct,smollm2-135m-instruct")
('implicit', ['smollm2-135m-instruct', 'smollm2-135m-instruct'])
>>> parse_scorer("reward:./my-rm@POSITIVE")
('reward', ['./my-rm', 'POSITIVE'])
>>> parse_scorer("function:math:hypot")
('function', ['math', 'hypot'])
>>> parse_scorer("implicit:onlyone")
Traceback (most recent call last):
ValueError: implicit needs two models: implicit:TUNED,UNTUNED (the same name twice is fine)
>>> scorer = FunctionScorer(lambda prompt, response: len(response))
>>> scoring = scorer.start(PromptRequest(question="Say hi."), rows=2)
>>> scoring.score(["Hi", "Hello!"])
[2.0, 6.0]
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from towline.methods.base import Participant
from towline.models import load_model, registry
from towline.models.base import Model, ModelError, ScoreState
from towline.prompts import PromptRequest

SCORER_KINDS = ("implicit", "reward", "function")


class Scoring(ABC):
    """One request's candidates being scored; row ``i`` is the search's candidate ``i``."""

    calls: dict[str, int]
    """Scoring passes per model (or per function), for the result's ``model_calls``."""
    prompts: dict[str, str]
    templates: dict[str, str]

    @abstractmethod
    def score(self, responses: Sequence[str]) -> list[float]:
        """The score of every candidate's text so far (the answer after ``answer_start``)."""

    @abstractmethod
    def reorder(self, rows: Sequence[int]) -> None:
        """Follow the search's selection: row ``i`` becomes old row ``rows[i]`` (repeats allowed)."""

    def close(self) -> None:
        """Release per-request state (caches)."""


class Scorer(ABC):
    """Scores candidate answers. Models it opened itself are closed by :meth:`close`."""

    spec: str
    """What it is, as a spec string (shown in results)."""
    concurrent: bool = False
    """Whether several threads may score at once (only where every model it uses allows it)."""

    @abstractmethod
    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        """Begin scoring ``rows`` candidates for ``request``; ``room`` is how many tokens the
        answers may grow to (prompts that leave no room for it are refused)."""

    def close(self) -> None:
        """Close the models this scorer opened."""

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- implicit value ------------------------------------------------------------------------


class ImplicitValue(Scorer):
    """``log p_tuned(y) - log p_untuned(y)``, each model on its own prompt (see the module
    docstring). ``*_template`` overrides a model's prompt template (a family name, ``plain``
    or Jinja); ``*_system`` replaces the request's system text in that model's prompt, which
    is how one chat model with and without an instruction makes a tuned/untuned pair.
    """

    @property
    def concurrent(self) -> bool:  # type: ignore[override]
        return self.tuned.concurrent and self.untuned.concurrent

    def __init__(self, tuned: Model, untuned: Model, *, tuned_template: str | None = None,
                 untuned_template: str | None = None, tuned_system: str | None = None,
                 untuned_system: str | None = None, spec: str | None = None,
                 owned: Sequence[Model] = ()) -> None:
        self.tuned, self.untuned = tuned, untuned
        self.tuned_template, self.untuned_template = tuned_template, untuned_template
        self.tuned_system, self.untuned_system = tuned_system, untuned_system
        self.spec = spec or f"implicit:{tuned.name},{untuned.name}"
        self._owned = list(owned)

    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        # As in logit arithmetic: the tuned model gets its chat template, the untuned one plain text.
        sides = {"tuned": (self.tuned, self.tuned_template, self.tuned_system, True),
                 "untuned": (self.untuned, self.untuned_template, self.untuned_system, False)}
        prompts, templates, states = {}, {}, {}
        for role, (model, template, system, chat) in sides.items():
            own = request if system is None else dataclasses.replace(request, system=system)
            built = Participant(model, template=template).prompt(own, chat=chat, room=room, role=role)
            prompts[role], templates[role] = built.text, built.template
        try:
            for role, (model, *_) in sides.items():
                states[role] = model.open_scoring([prompts[role]] * rows)
        except BaseException:
            for state in states.values():
                state.close()
            raise
        return _ImplicitScoring(states, prompts, templates)

    def close(self) -> None:
        for model in self._owned:
            model.close()
        self._owned = []


class _ImplicitScoring(Scoring):
    def __init__(self, states: dict[str, ScoreState], prompts: dict[str, str], templates: dict[str, str]) -> None:
        self._states = states
        self.prompts, self.templates = prompts, templates
        self.calls = dict.fromkeys(states, 0)

    def score(self, responses: Sequence[str]) -> list[float]:
        logprobs = {}
        for role, state in self._states.items():
            self.calls[role] += 1
            logprobs[role] = state.score(responses)
        return [float(t - u) for t, u in zip(logprobs["tuned"], logprobs["untuned"])]

    def reorder(self, rows: Sequence[int]) -> None:
        for state in self._states.values():
            state.reorder(rows)

    def close(self) -> None:
        for state in self._states.values():
            state.close()


# -- reward model and plain functions: judges of whole texts ---------------------------------


class _TextScoring(Scoring):
    """Scores each distinct answer once: ``judge(prompt, answer)`` for every text not seen
    before in this request (candidates that did not change, or were copied, cost nothing)."""

    def __init__(self, request: PromptRequest, judge: Callable[[str, str], float], role: str) -> None:
        self._request = request
        self._judge = judge
        self._role = role
        self._known: dict[str, float] = {}
        self.calls = {role: 0}
        self.prompts, self.templates = {}, {}

    def score(self, responses: Sequence[str]) -> list[float]:
        new = [text for text in dict.fromkeys(responses) if text not in self._known]
        if new:
            self.calls[self._role] += 1
        for text in new:
            value = self._judge(self._request.question, self._request.answer_start + text)
            if not math.isfinite(value):
                raise ValueError(f"the {self._role} scorer gave {value} for {text!r}: scores must be finite numbers")
            self._known[text] = value
        return [self._known[text] for text in responses]

    def reorder(self, rows: Sequence[int]) -> None:
        """Rows hold no state of their own: scores are kept by text."""


class FunctionScorer(Scorer):
    """A Python function of ``(prompt, response) -> float``: ``prompt`` is the request's
    question, ``response`` the answer so far, beginning with the request's ``answer_start``."""

    def __init__(self, function: Callable[[str, str], float], *, spec: str | None = None) -> None:
        self.function = function
        self.spec = spec or f"function:{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', '?')}"

    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        return _TextScoring(request, lambda prompt, response: float(self.function(prompt, response)), "function")


class RewardModel(Scorer):
    """A transformers sequence-classification model as the judge (see the module docstring).

    A model whose tokenizer has a chat template reads the exchange (user: the request's
    question; assistant: the answer so far); one without reads the answer alone (e.g. a
    sentiment classifier of a review). Each distinct answer is read in full, since a
    classifier's judgement of a text may change with every word added to it.
    """

    def __init__(self, source: str, label: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = f"reward:{source}" + (f"@{label}" if label else "")
        options: dict = {}
        if not Path(source).expanduser().exists():
            # A Hub id: fail at once when it cannot load here, rather than after the Hub client's retries.
            try:
                options = registry.hub_options(source)
            except ModelError as error:
                reason = str(error).splitlines()[0].partition(": ")[2]
                raise ModelError(f"could not load reward model {source!r}: {reason}\nGive a local directory or "
                                 "a Hugging Face id of a sequence-classification model (needs the Hub or its "
                                 "cache).") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **options)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32,
                                                                            **options).eval()
        except OSError as error:
            raise ModelError(f"could not load reward model {source!r}: {error}\nGive a local directory or a "
                             "Hugging Face id of a sequence-classification model (needs the Hub or its cache).") from error
        labels = {name.lower(): index for name, index in (self.model.config.label2id or {}).items()}
        count = self.model.config.num_labels
        if label is None:
            if count != 1:
                names = ", ".join(self.model.config.id2label[i] for i in range(count))
                raise ModelError(f"reward model {source!r} has {count} labels ({names}): say which one to "
                                 f"score, e.g. reward:{source}@{self.model.config.id2label[count - 1]}")
            self.label = 0
        elif label.lower() in labels:
            self.label = labels[label.lower()]
        elif label.isdigit() and int(label) < count:
            self.label = int(label)
        else:
            names = ", ".join(self.model.config.id2label[i] for i in range(count))
            raise ModelError(f"reward model {source!r} has no label {label!r}; its labels: {names}")

    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        return _TextScoring(request, self.judge, "reward")

    def judge(self, prompt: str, answer: str) -> float:
        """The score of ``answer`` to ``prompt`` (see the class docstring)."""
        import torch

        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
            inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            inputs = self.tokenizer(answer, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0].float()
        if logits.numel() == 1:
            return logits.item()
        others = torch.cat([logits[: self.label], logits[self.label + 1:]])
        return (logits[self.label] - torch.logsumexp(others, dim=0)).item()

    def close(self) -> None:
        self.model = None


# -- specs ----------------------------------------------------------------------------------


def parse_scorer(spec: str) -> tuple[str, list[str]]:
    """Split a scorer spec into its kind and arguments, checking its shape (nothing loads)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SCORER_KINDS:
        raise ValueError(f"unknown scorer {spec!r}: write implicit:TUNED,UNTUNED, reward:MODEL[@LABEL] "
                         "or function:MODULE:NAME")
    if kind == "implicit":
        models = [part.strip() for part in rest.split(",")]
        if len(models) != 2 or not all(models):
            raise ValueError("implicit needs two models: implicit:TUNED,UNTUNED (the same name twice is fine)")
        return kind, models
    if kind == "reward":
        source, _, label = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not source:
            raise ValueError("reward needs a model: reward:MODEL or reward:MODEL@LABEL")
        return kind, [source, label] if label else [source]
    module, _, name = rest.rpartition(":")
    if not module or not name:
        raise ValueError(f"function needs a module and a name: function:MODULE:NAME, got {spec!r}")
    return kind, [module, name]


def import_function(module: str, name: str) -> Callable[[str, str], float]:
    """The callable ``name`` of ``module`` (a dotted module name or a ``.py`` file path)."""
    try:
        if module.endswith(".py"):
            path = Path(module)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.is_file():
                raise ImportError(f"no file {module}")
            loaded = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"cannot import {module!r} for the function scorer: {error}") from None
    function = getattr(loaded, name, None)
    if not callable(function):
        raise ValueError(f"{module} has no function {name!r} to score with")
    return function


def open_scorer(spec: str, *, tuned_template: str | None = None, untuned_template: str | None = None,
                tuned_system: str | None = None, untuned_system: str | None = None) -> Scorer:
    """Open the scorer a spec names, loading its models (closed by :meth:`Scorer.close`). The
    ``tuned_*``/``untuned_*`` settings are for ``implicit`` scorers; a model named twice is
    loaded once."""
    kind, args = parse_scorer(spec)
    if kind == "function":
        return FunctionScorer(import_function(*args), spec=spec)
    if kind == "reward":
        return RewardModel(*args)
    with ExitStack() as stack:
        tuned = stack.enter_context(load_model(args[0]))
        untuned = tuned if args[1] == args[0] else stack.enter_context(load_model(args[1]))
        stack.pop_all()
    return ImplicitValue(tuned, untuned, tuned_template=tuned_template, untuned_template=untuned_template,
                         tuned_system=tuned_system, untuned_system=untuned_system, spec=spec,
                         owned=[tuned] if tuned is untuned else [tuned, untuned])
