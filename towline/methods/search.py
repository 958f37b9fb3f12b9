"""Weak-to-strong search (Zhou et al., arXiv 2405.19262; docs/search.md): the base samples
candidates, a scorer built from small models picks which to keep.

**Chunk-level beam search** (``cbs``): start with W·K copies of the prompt; sample L more
tokens from the base for every unfinished candidate; score every candidate's whole partial
answer; keep the best W, give each K copies, and repeat until every candidate has ended or
the token budget is spent. **Best-of-N** (``bon``) is the special case W = 1, K = N, L
unbounded: N full answers, the best-scoring one wins.

All W·K candidates decode as one batch in one :class:`~towline.models.base.DecodeState`;
a selection reorders its rows (and the KV cache behind them) rather than recomputing
anything, and the scorer's own per-candidate state follows the same reordering, so each
chunk is scored on top of its candidate's cached prefix.

Candidates must differ, so the base always samples: its temperature, top-k and top-p come
from its sampling settings, where greedy (the command line's default) means the paper's
temperature 0.7, and top-k 0 means the paper's 50 (a candidate's next token is read among
the base's top-k).

>>> search_sampling(Sampling())
Sampling(temperature=0.7, top_p=1.0, top_k=50, seed=None)
>>> search_sampling(Sampling(temperature=1.0, top_p=0.9, seed=3))
Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=3)
>>> from towline.methods import METHODS
>>> METHODS["cbs"](w=2, k=2, l=30).shape, METHODS["cbs"](l=0).shape, METHODS["bon"](n=4).shape
((2, 2, 30), (2, 2, None), (1, 4, None))
"""

from __future__ import annotations

import dataclasses
import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import ClassVar

import torch

from towline.methods.base import (BASE, Method, OnText, OptionError, Participant, Result, Role, option,
                                   positive, register)
from towline.methods.scorers import Scorer, import_function, open_scorer, parse_scorer
from towline.models.base import Distribution, ModelError, Sampling, Token
from towline.prompts import PromptRequest, check_template
from towline.sampling import choose, generator

SEARCH_TEMPERATURE = 0.7
SEARCH_TOP_K = 50
"""The paper's sampling settings, used where the base's own say greedy / no top-k."""
DEFAULT_SCORER = "implicit:smollm2-135m-instruct,smollm2-135m-instruct"
IMPLICIT_OPTIONS = ("tuned_template", "untuned_template", "tuned_system", "untuned_system")


def search_sampling(sampling: Sampling) -> Sampling:
    """How the base samples candidates: its own settings, with the paper's temperature where
    they say greedy and the paper's top-k where they set none."""
    temperature = SEARCH_TEMPERATURE if sampling.greedy else sampling.temperature
    return dataclasses.replace(sampling, temperature=temperature, top_k=sampling.top_k or SEARCH_TOP_K)


@dataclass
class Candidate:
    """One final candidate: its text, its score, its length in base tokens, and whether the
    base ended it."""

    text: str
    score: float
    tokens: int
    ended: bool


@dataclass(kw_only=True)
class SearchResult(Result):
    score: float | None
    """The returned answer's score (None when a model failed before the first selection)."""
    candidates: list[Candidate] | None
    """All W final candidates, best first, when ``all_candidates`` is set."""
    selections: int
    """How many times candidates were scored and selected."""
    candidate_tokens: int
    """Tokens the base sampled over all candidates (the search's decoding work)."""
    sampling: dict[str, float | int | None]
    """The base's sampling settings used."""
    scorer: str


@dataclass(kw_only=True)
class _Search(Method):
    """What ``cbs`` and ``bon`` share: the scorer and its prompts, and the search loop."""

    roles: ClassVar[tuple[Role, ...]] = (BASE,)

    scorer: str | Scorer = option(DEFAULT_SCORER, "implicit:TUNED,UNTUNED | reward:MODEL[@LABEL] | "
                                                  "function:MODULE:NAME (see docs/search.md).")
    tuned_template: str | None = option(None, "implicit scorer: the tuned model's template (default: its chat template).")
    untuned_template: str | None = option(None, "implicit scorer: the untuned model's template (default: plain text).")
    tuned_system: str | None = option(None, "implicit scorer: system text of the tuned model's prompt (default: the request's).")
    untuned_system: str | None = option(None, "implicit scorer: system text of the untuned model's prompt (default: the request's).")
    all_candidates: bool = option(False, "Also return all W final candidates with their scores.")

    _scorer = None  # the scorer opened by __enter__ (a plain attribute, not an option)
    _owns_scorer = False

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int | None]:
        """(W, K, L), L None for unbounded."""

    def check(self) -> None:
        kind = "open"
        if isinstance(self.scorer, str):
            try:
                kind, args = parse_scorer(self.scorer)
                if kind == "function":
                    import_function(*args)
            except ValueError as error:
                raise OptionError("scorer", str(error)) from None
        for name in IMPLICIT_OPTIONS:
            if getattr(self, name) is not None and kind != "implicit":
                raise OptionError(name, "only applies to a scorer given as an implicit:TUNED,UNTUNED spec "
                                        "(set it on the ImplicitValue you pass instead)" if kind == "open" else
                                        f"only applies to implicit scorers, not to {kind} ones")
        for name in ("tuned_template", "untuned_template"):
            if getattr(self, name) is not None:
                try:
                    check_template(getattr(self, name))
                except ValueError as error:
                    raise OptionError(name, str(error)) from None

    def open_scorer(self) -> Scorer:
        """The scorer: the one given open, or a new one from the spec (the caller closes it)."""
        if isinstance(self.scorer, Scorer):
            return self.scorer
        return open_scorer(self.scorer, tuned_template=self.tuned_template, untuned_template=self.untuned_template,
                           tuned_system=self.tuned_system, untuned_system=self.untuned_system)

    @property
    def concurrent(self) -> bool:
        shared = self._scorer or (self.scorer if isinstance(self.scorer, Scorer) else None)
        return shared is None or shared.concurrent  # a scorer opened per answer is its own

    def __enter__(self) -> _Search:
        if self._scorer is None:
            self._scorer = self.open_scorer()
            self._owns_scorer = not isinstance(self.scorer, Scorer)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scorer is not None and self._owns_scorer:
            self._scorer.close()
        self._scorer = None

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> SearchResult:
        with ExitStack() as stack:
            scorer = self._scorer
            if scorer is None:
                scorer = self.open_scorer()
                if scorer is not self.scorer:
                    stack.callback(scorer.close)
            return _search(self, request, models["base"], scorer, on_text)


@register
@dataclass(kw_only=True)
class ChunkBeamSearch(_Search):
    """Chunk-level beam search over the base's samples, guided by a scorer (docs/search.md)."""

    name: ClassVar[str] = "cbs"
    summary: ClassVar[str] = "Chunk-level beam search: the base samples, small models' scores pick."

    w: int = option(2, "Beam width: candidates kept at each selection.")
    k: int = option(2, "Successors per kept candidate.")
    l: int | None = option(30, "Chunk length in base tokens between selections (0 or none: unbounded).")

    def check(self) -> None:
        super().check()
        positive(self, "w", "k")
        if self.l is not None and self.l < 0:
            raise OptionError("l", f"must be at least 1, or 0/none for unbounded, got {self.l}")

    @property
    def shape(self) -> tuple[int, int, int | None]:
        return self.w, self.k, self.l or None


@register
@dataclass(kw_only=True)
class BestOfN(_Search):
    """Best-of-N: N full samples from the base, the best-scoring one wins (CBS with W=1, K=N)."""

    name: ClassVar[str] = "bon"
    summary: ClassVar[str] = "Best-of-N: N samples from the base, the best-scoring one wins."

    n: int = option(4, "Number of samples.")

    def check(self) -> None:
        super().check()
        positive(self, "n")

    @property
    def shape(self) -> tuple[int, int, int | None]:
        return 1, self.n, None


def _search(method: _Search, request: PromptRequest, base: Participant, scorer: Scorer,
            on_text: OnText | None) -> SearchResult:
    w, k, l = method.shape
    max_tokens = method.max_tokens
    started = time.perf_counter()
    sampling = search_sampling(base.sampling)
    prompt = base.prompt(request, chat=False, room=max_tokens, role="base")
    rows = w * k
    scoring = scorer.start(request, rows, room=max_tokens)
    calls = {"base": 0}
    texts, lengths, ended = [""] * rows, [0] * rows, [False] * rows
    best: Candidate | None = None
    kept: list[Candidate] = []
    selections = candidate_tokens = generated = 0
    stop_reason, error = "", None
    rng = generator(sampling)
    state = None
    try:
        state = base.model.open([prompt.text] * rows)
        while generated < max_tokens and not all(ended):
            calls["base"] += 1
            for _ in range(min(l or max_tokens, max_tokens - generated)):
                tokens = _sample(state.next(top_logprobs=sampling.top_k), sampling, rng)
                for row, token in enumerate(tokens):
                    if ended[row]:
                        continue
                    if base.model.is_end(token):
                        ended[row] = True
                        continue
                    texts[row] += token.text
                    lengths[row] += 1
                    candidate_tokens += 1
                generated += 1
                if all(ended) or generated == max_tokens:
                    break
                # Ended rows are fed what they drew too; nothing of it is read.
                state.append(tokens)
            scores = scoring.score(texts)
            selections += 1
            order = sorted(range(rows), key=lambda row: -scores[row])[:w]  # stable: ties keep row order
            kept = [Candidate(texts[row], scores[row], lengths[row], ended[row]) for row in order]
            best = kept[0]
            successors = [order[i % w] for i in range(rows)]
            state.reorder(successors)
            scoring.reorder(successors)
            texts, lengths, ended = ([values[row] for row in successors] for values in (texts, lengths, ended))
        stop_reason = "end" if best.ended else "length"
    except ModelError as failure:
        stop_reason, error = "error", str(failure)
    finally:
        if state is not None:
            state.close()
        scoring.close()
    text = best.text if best else ""
    if on_text:
        on_text(text, "base")
    return SearchResult(
        method=method.name,
        text=text,
        stop_reason=stop_reason,
        error=error,
        tokens=best.tokens if best else 0,
        model_calls={**calls, **scoring.calls},
        seconds=time.perf_counter() - started,
        prompts={"base": prompt.text, **scoring.prompts},
        templates={"base": prompt.template, **scoring.templates},
        score=best.score if best else None,
        candidates=kept if method.all_candidates else None,
        selections=selections,
        candidate_tokens=candidate_tokens,
        sampling=dataclasses.asdict(sampling),
        scorer=scorer.spec,
    )


def _sample(distributions: Sequence[Distribution], sampling: Sampling,
            rng: torch.Generator | None) -> list[Token]:
    """One token per row, drawn with ``sampling`` among the rows' listed top tokens (the base
    lists its top-k). Local weights list the same tokens in the same order as their own
    sampled decoding draws among (:func:`towline.sampling.draw`), so one candidate is plain
    sampling, draw for draw; the whole vocabulary is never needed.
    """
    width = max(len(d.top) for d in distributions)
    scores = torch.full((len(distributions), width), -torch.inf)
    for row, d in enumerate(distributions):
        scores[row, : len(d.top)] = torch.tensor([t.logprob for t in d.top])
    chosen = choose(scores, sampling, rng).tolist()
    return [d.top[i] for d, i in zip(distributions, chosen)]
