"""The one model interface every method is written against.

A backend (local weights, an OpenAI-compatible server, ...) implements :class:`Model`.
Methods never import a backend: they call these few operations, all of which speak text
in and text out, so base and guide may use different tokenizers.

- :meth:`Model.complete` -- decode a batch of prompts (greedy or sampled), returning each
  token together with the next-token distribution it was taken from.
- :meth:`Model.stream` -- the same for one prompt, a step at a time; stop reading any time.
- :meth:`Model.score` -- log-probs of a given continuation and the distribution at each of
  its positions, in one pass. Verifying a drafted run of tokens is a ``score`` call.
- :meth:`Model.open` -- an incremental :class:`DecodeState` for a batch: next-token
  distributions (the full vocabulary where the backend has it), append tokens, feed several
  at once, roll back, reorder rows (beam search), so methods can run their own decoding loop.
- :meth:`Model.open_scoring` -- a :class:`ScoreState`: log-probs of growing continuations of
  a batch of prompts, each row's work in proportion to what it grew by (search scorers).
- :meth:`Model.count_tokens` -- length of a text in this model's tokens.

``complete`` and ``stream`` take ``lookup`` texts to draft from: a backend that checks several
tokens in one pass (local weights) verifies the drafts, so greedy text comes faster and the same.

Methods that mix distributions token by token need two more facts about a model:
:attr:`Model.vocabulary` (equal values mean shared token ids; :func:`check_shared_vocabulary`
refuses models that differ) and its end of text (:meth:`Model.is_end`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


SEED_LIMIT = 2**63
"""Seeds are in ``[0, SEED_LIMIT)``: what torch and servers take as a signed 64-bit integer."""


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. ``temperature == 0`` is greedy decoding.

    >>> Sampling().greedy, Sampling(temperature=0.7, seed=1).greedy
    (True, False)
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class Token:
    """One token: its text, log-probability and (where the backend knows it) its id."""

    text: str
    logprob: float
    id: int | None = None


@dataclass(frozen=True)
class Step:
    """One position: the token taken there and the most likely alternatives, best first.

    Log-probs are under the distribution the token was drawn from: the plain softmax for
    greedy decoding; for sampled decoding, after temperature, top-k and top-p on local
    weights. Servers report only the raw (temperature 1) distribution, also when sampling.

    >>> s = Step(Token("a", math.log(0.3)), (Token("b", math.log(0.6)), Token("a", math.log(0.3))))
    >>> round(s.top1_prob, 3)
    0.6
    """

    token: Token
    top: tuple[Token, ...] = ()

    @property
    def top1_prob(self) -> float:
        """Highest next-token probability at this position."""
        # Servers may drop entries of top_logprobs whose strings collide; the taken token's
        # own logprob is always exact, so it bounds the top-1 from below.
        best = max((t.logprob for t in self.top), default=-math.inf)
        return math.exp(max(best, self.token.logprob))


FinishReason = Literal["end", "stop", "length"]
"""``end``: the model's own end of text; ``stop``: a stop string; ``length``: the budget."""


@dataclass
class Completion:
    """A decoded continuation of one prompt. ``steps`` holds one entry per generated token
    (the end-of-text token is not one of them)."""

    text: str
    steps: list[Step]
    finish_reason: FinishReason

    @property
    def ended(self) -> bool:
        """True when the model itself ended its text (EOS / end of turn)."""
        return self.finish_reason == "end"


@dataclass
class Scored:
    """A given continuation scored under a prompt: one step per continuation token."""

    steps: list[Step]

    @property
    def logprob(self) -> float:
        return sum(s.token.logprob for s in self.steps)


@dataclass
class Distribution:
    """A next-token distribution. ``top`` is always there (best first); ``full`` holds
    log-probs over the whole vocabulary (index = token id) where the backend has them."""

    top: tuple[Token, ...]
    full: np.ndarray | None = field(default=None, repr=False)


class DecodeState(ABC):
    """Incremental decoding of a batch of rows, for methods that run their own loop
    (logit arithmetic, beam search, verifying drafted tokens). Local backends keep a KV cache
    behind it and never recompute it: appending, extending, reordering and rolling back all
    work on the cache. Close a state when done (or use it as a context manager): a closed
    state refuses further use.

    A token is a :class:`Token` taken from this model's distributions, or (local backends)
    a bare token id; servers take tokens by text, so they need :class:`Token`.
    """

    @abstractmethod
    def next(self, *, top_logprobs: int = 20) -> list[Distribution]:
        """The next-token distribution of every row (raw model distribution, temperature 1)."""

    @abstractmethod
    def append(self, tokens: Sequence[Token | int]) -> None:
        """Extend each row by one token (``tokens[i]`` goes to row ``i``)."""

    @abstractmethod
    def extend(self, tokens: Sequence[Sequence[Token | int]], *,
               top_logprobs: int = 20) -> list[list[Distribution]]:
        """Feed several tokens to each row at once (``tokens[i]`` to row ``i``; rows may get
        different numbers, none included) and return, per row, the next-token distribution
        after each of its new tokens: ``extend(...)[i][-1]`` is what :meth:`next` then gives
        for row ``i``. On local weights this is one forward pass for the whole batch: the way
        to verify a drafted run of tokens on top of the cache."""

    @abstractmethod
    def truncate(self, counts: int | Sequence[int]) -> None:
        """Roll back the last ``counts`` tokens of every row (or ``counts[i]`` of row ``i``),
        as if they had never been appended; the prompt itself cannot be rolled back."""

    @abstractmethod
    def reorder(self, rows: Sequence[int]) -> None:
        """Keep the rows listed, in that order (repeats allowed): row ``i`` becomes old ``rows[i]``."""

    @property
    @abstractmethod
    def texts(self) -> list[str]:
        """What each row has appended so far."""

    def close(self) -> None:
        """Release what the state holds (a KV cache). Closing twice is harmless."""

    def __enter__(self) -> DecodeState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_counts(counts: int | Sequence[int], rows: int) -> list[int]:
    """One non-negative count per row, from one count for all rows or a list of them.

    >>> row_counts(2, 3), row_counts([0, 1], 2)
    ([2, 2, 2], [0, 1])
    >>> row_counts([1], 2)
    Traceback (most recent call last):
    ValueError: 1 counts for 2 rows
    """
    counts = [counts] * rows if isinstance(counts, int) else list(counts)
    if len(counts) != rows:
        raise ValueError(f"{len(counts)} counts for {rows} rows")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {counts}")
    return counts


class ScoreState(ABC):
    """Log-probabilities of growing continuations of a batch of prompts, for scorers that
    judge candidates again and again as they grow (weak-to-strong search).

    :meth:`score` gives, per row, what :meth:`Model.score` gives summed: the log-probability
    of the continuation's tokens (the prompt and continuation are tokenized together, as
    text, and scored from the first token that is not the prompt's own). A row is re-read
    only from its first token that changed since it was last scored, so a candidate that
    grows by a chunk costs that chunk, not its whole text.
    """

    @abstractmethod
    def score(self, continuations: Sequence[str]) -> list[float]:
        """The log-probability of ``continuations[i]`` after the prompt of row ``i``."""

    @abstractmethod
    def reorder(self, rows: Sequence[int]) -> None:
        """Keep the rows listed, in that order (repeats allowed): row ``i`` becomes old ``rows[i]``."""

    def close(self) -> None:
        """Release what the state holds (caches)."""


class RescoringState(ScoreState):
    """A :class:`ScoreState` for any model: every row whose text changed is scored again in
    full with :meth:`Model.score` (one call for the batch). Backends with a KV cache do better.
    """

    def __init__(self, model: Model, prompts: Sequence[str]) -> None:
        self._model = model
        self._prompts = list(prompts)
        self._texts: list[str | None] = [None] * len(self._prompts)
        self._totals = [0.0] * len(self._prompts)

    def score(self, continuations: Sequence[str]) -> list[float]:
        if len(continuations) != len(self._prompts):
            raise ValueError(f"{len(continuations)} continuations for {len(self._prompts)} rows")
        changed = [i for i, text in enumerate(continuations) if text != self._texts[i]]
        if changed:
            scored = self._model.score([self._prompts[i] for i in changed], [continuations[i] for i in changed])
            for i, result in zip(changed, scored):
                self._texts[i], self._totals[i] = continuations[i], result.logprob
        return list(self._totals)

    def reorder(self, rows: Sequence[int]) -> None:
        self._prompts = [self._prompts[i] for i in rows]
        self._texts = [self._texts[i] for i in rows]
        self._totals = [self._totals[i] for i in rows]


class Model(ABC):
    """A language model that towline can steer or be steered by."""

    name: str
    chat_template: str | None = None
    """The model's own chat template (Jinja), where it ships one."""
    concurrent: bool = False
    """Whether several threads may call the model at once (a server takes many requests;
    local weights hold one decoding state, so callers take turns)."""
    merges_calls: bool = False
    """Whether answers run under :func:`towline.models.together.run_together` get their calls
    to this model merged into batches (local weights: one forward pass for all the answers),
    so that answering several requests together pays."""
    context_length: int | None = None
    """Most tokens (prompt and output together) the model attends to; None where unknown."""
    vocabulary: str | None = None
    """Which vocabulary the model's token ids index: two models with the same value share
    token ids, so their distributions can be added position by position. None where unknown
    (then nothing can be checked)."""
    end_ids: frozenset[int] = frozenset()
    """Ids of the tokens that end the model's text (end of text, end of turn); empty where
    the backend has no ids."""
    end_texts: frozenset[str] = frozenset()
    """How a backend without ids shows an end-of-text token as text (``""`` for llama.cpp)."""

    def is_end(self, token: Token) -> bool:
        """Whether ``token`` (taken from this model's distributions) ends its text: by id
        where the token has one, else by its text."""
        return token.id in self.end_ids if token.id is not None else token.text in self.end_texts

    @abstractmethod
    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        sampling: Sampling = GREEDY,
        top_logprobs: int = 1,
        stop: Sequence[str] = (),
        lookup: Sequence[str] = (),
    ) -> list[Completion]:
        """Continue each prompt by up to ``max_tokens`` tokens.

        ``lookup``: texts the continuation may well repeat stretches of (a draft, an earlier
        answer). A backend that checks several tokens in one pass (local weights) drafts from
        them, as from the prompt, when it decodes one prompt greedily; the text is what it is
        without them. Backends that do not draft ignore them."""

    @abstractmethod
    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        sampling: Sampling = GREEDY,
        top_logprobs: int = 1,
        lookup: Sequence[str] = (),
    ) -> Generator[Step, None, None]:
        """Continue one prompt, yielding each step as soon as it is decoded.

        Closing the generator early (``.close()``, or leaving a ``with closing(...)``) stops
        the decoding, so asking for a long continuation and reading one step costs one step
        (a backend that drafts may have checked a few more in the same pass). The generator
        simply ends at the model's end of text. ``lookup`` is :meth:`complete`'s."""

    @abstractmethod
    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], *, top_logprobs: int = 1
    ) -> list[Scored]:
        """Score ``continuations[i]`` as a continuation of ``prompts[i]``, in one pass each."""

    @abstractmethod
    def open(self, prompts: Sequence[str]) -> DecodeState:
        """Start incremental decoding of a batch of prompts."""

    def open_scoring(self, prompts: Sequence[str]) -> ScoreState:
        """Score growing continuations of a batch of prompts (see :class:`ScoreState`). This
        default re-scores each changed row in full; local weights keep a KV cache per row."""
        return RescoringState(self, prompts)

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of this model's tokens in ``text`` (no special tokens added)."""

    def close(self) -> None:
        """Release resources (connections, memory). Models are also context managers."""

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Delegating(Model):
    """A model that passes every call on to ``model``: the base of wrappers that watch,
    record or share another model's calls (they override the calls they watch). It
    describes itself as ``model`` does: name, template, context, vocabulary, end of text,
    concurrency, merging."""

    DESCRIPTION = ("name", "chat_template", "context_length", "vocabulary", "end_ids", "end_texts", "concurrent",
                   "merges_calls")

    def __init__(self, model: Model) -> None:
        self.model = model
        for attribute in self.DESCRIPTION:
            setattr(self, attribute, getattr(model, attribute))

    def complete(self, prompts: Sequence[str], **kwargs: Any) -> list[Completion]:
        return self.model.complete(prompts, **kwargs)

    def stream(self, prompt: str, **kwargs: Any) -> Generator[Step, None, None]:
        return self.model.stream(prompt, **kwargs)

    def score(self, prompts: Sequence[str], continuations: Sequence[str], **kwargs: Any) -> list[Scored]:
        return self.model.score(prompts, continuations, **kwargs)

    def open(self, prompts: Sequence[str]) -> DecodeState:
        return self.model.open(prompts)

    def open_scoring(self, prompts: Sequence[str]) -> ScoreState:
        return self.model.open_scoring(prompts)

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)


class ModelError(RuntimeError):
    """A model could not be loaded or reached; the message says what to do."""


def check_shared_vocabulary(models: Mapping[str, Model]) -> None:
    """Refuse models (by role) that index different vocabularies, naming both; models whose
    vocabulary is unknown (None) are taken on trust.

    >>> class Named(Model):
    ...     complete = stream = score = open = count_tokens = None
    ...     def __init__(self, name, vocabulary):
    ...         self.name, self.vocabulary = name, vocabulary
    >>> check_shared_vocabulary({"base": Named("a", "v1"), "tuned": Named("b", None)})
    >>> check_shared_vocabulary({"base": Named("a", "v1"), "tuned": Named("b", "v2")})
    Traceback (most recent call last):
    towline.models.base.ModelError: the base model a and the tuned model b use different vocabularies (v1 and v2): their token ids do not line up, so their distributions cannot be mixed; give models of one family (same tokenizer)
    """
    known = [(role, model) for role, model in models.items() if model.vocabulary is not None]
    for role, model in known[1:]:
        first_role, first = known[0]
        if model.vocabulary != first.vocabulary:
            raise ModelError(f"the {first_role} model {first.name} and the {role} model {model.name} use "
                             f"different vocabularies ({first.vocabulary} and {model.vocabulary}): their "
                             "token ids do not line up, so their distributions cannot be mixed; give "
                             "models of one family (same tokenizer)")
