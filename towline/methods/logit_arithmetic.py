"""Logit arithmetic (docs/logit-arithmetic.md): proxy-tuning / emulated fine-tuning, and the ensemble baseline.

At every position each model reads its own prompt plus the answer so far, and the next token
is chosen from a mixture of their next-token distributions:

- **proxy-tuning** (alias **eft**): ``log p_base + Σ α_i · (log p_tuned_i − log p_untuned_i)``,
  one term per (tuned, untuned, α) triple: the change that tuning made to a small model is
  added to the large base model, in log-prob space.
- **ensemble**: ``p_base + p_guide`` over the union of the two models' top-k tokens.

The mixture then goes through the one sampler (:mod:`towline.sampling`) with the base role's
sampling settings. Mixing token by token needs one vocabulary: models whose vocabularies
differ are refused.

Two ways to compute it, chosen by what the models give:

- **exact** (local weights): every model's full distribution, from one
  :class:`~towline.models.base.DecodeState` (KV cache) per model, fed one token a step;
- **top-k approximation** (OpenAI-compatible servers, which return only ``top_logprobs``
  tokens by text): proxy-tuning scores the tokens that are in *every* list (base and each
  pair with α ≠ 0) and falls back to the base's list where they share none; the ensemble
  counts a probability a server did not report as 0.

>>> proxy_scores(np.log([[0.5, 0.3, 0.2]]), [np.log([[0.2, 0.6, 0.2]])], [np.log([[0.4, 0.4, 0.2]])], [1.0])
array([[-1.38629436, -0.7985077 , -1.60943791]])
>>> [round(math.exp(s), 3) for s in _approximate_proxy(
...     [{"a": math.log(0.5), "b": math.log(0.3)}, {"b": math.log(0.6), "a": math.log(0.2)},
...      {"a": math.log(0.4), "b": math.log(0.4)}], [1.0])[1]]
[0.25, 0.45]
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Collection, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from towline.methods.base import Method, OnText, OptionError, Participant, Result, Role, option, positive, register
from towline.models.base import DecodeState, Distribution, ModelError, Token, check_shared_vocabulary
from towline.prompts import BuiltPrompt, PromptRequest
from towline.sampling import choose, generator

MAX_PAIRS = 3
"""Most (tuned, untuned) pairs one proxy-tuning call takes: roles tuned/untuned, tuned2/untuned2, ..."""

BASE = Role("base", chat=False, help="The large model being steered (plain prompt).",
            default="qwen2.5-coder-1.5b-instruct")


def pair_roles(pair: int) -> tuple[Role, Role]:
    """The (tuned, untuned) roles of pair ``pair`` (1-based); only the first has defaults."""
    suffix = "" if pair == 1 else str(pair)
    first = pair == 1
    tuned = Role(f"tuned{suffix}", chat=True, required=first,
                 default="qwen2.5-coder-0.5b-instruct" if first else None,
                 help="A small tuned (chat) model whose change is added (chat prompt)." +
                      ("" if first else f" Pair {pair}: optional, with --untuned{suffix}."))
    untuned = Role(f"untuned{suffix}", chat=False, required=first,
                   default="qwen2.5-coder-0.5b-instruct" if first else None,
                   help="The tuned model before tuning (plain prompt)." +
                        ("" if first else f" Pair {pair}: optional, with --tuned{suffix}."))
    return tuned, untuned


PAIRS = [pair_roles(pair) for pair in range(1, MAX_PAIRS + 1)]


@dataclass(kw_only=True)
class MixingResult(Result):
    exact: bool
    """True on local weights (full distributions); False for the top-k approximation."""
    steered_tokens: int
    """Output tokens that are not the base's own most likely token at their position."""

    @property
    def steered_fraction(self) -> float:
        return self.steered_tokens / self.tokens if self.tokens else 0.0


@dataclass(kw_only=True)
class ProxyTuningResult(MixingResult):
    alpha: list[float]
    """The weight of each pair, in pair order."""
    fallback_tokens: int
    """Approximation only: positions where the lists shared no token and the base's was used."""


@dataclass(kw_only=True)
class _Mixing(Method):
    """The decoding loop both methods share; subclasses say how distributions combine."""

    top_logprobs: int = option(20, "K: how many top tokens each model reports. Over OpenAI-compatible "
                                   "servers the mixture is computed over these (an approximation); "
                                   "local weights are exact (the ensemble always uses the union of top-K).")

    def check(self) -> None:
        positive(self, "top_logprobs")

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> MixingResult:
        started = time.perf_counter()
        roles = {role.name: role for role in self.roles if role.name in models}
        check_shared_vocabulary({name: models[name].model for name in roles})
        prompts = {name: models[name].prompt(request, chat=role.chat, room=self.max_tokens, role=name)
                   for name, role in roles.items()}
        return _Decoding(self, models, prompts, on_text, started).run()

    steering_role: ClassVar[str]
    """The role an output token is shown as (``--show``) where the base would have taken another."""

    @abstractmethod
    def mix_full(self, full: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores over token ids from every role's full log-probs (exact)."""

    @abstractmethod
    def mix_top(self, tops: Mapping[str, dict[str, float]]) -> tuple[list[str], list[float], bool]:
        """Candidate texts and their scores from every role's top list (text -> log-prob), and
        whether the candidates are the base's list as a fallback (approximation)."""

    def result(self, *, fallback_tokens: int, **fields) -> MixingResult:
        return MixingResult(method=self.name, **fields)


class _Decoding:
    """One answer, one token a step, until the end or the budget.

    Roles played by one model object (the tuned and untuned roles of one small model) share
    one decode state, a row each: one forward pass serves them all."""

    def __init__(self, method: _Mixing, models: Mapping[str, Participant],
                 prompts: dict[str, BuiltPrompt], on_text: OnText | None, started: float) -> None:
        self.method = method
        self.models = {name: models[name] for name in prompts}
        self.prompts = prompts
        self.on_text = on_text
        self.started = started
        self.calls = dict.fromkeys(prompts, 0)
        self.sampling = models["base"].sampling
        self.rng = generator(self.sampling)
        self.exact = True
        self.steered = self.fallbacks = 0
        self.groups: dict[int, list[str]] = {}  # model object -> the roles it plays, one row each
        for name in prompts:
            self.groups.setdefault(id(self.models[name].model), []).append(name)

    def distributions(self, states: Mapping[int, DecodeState]) -> dict[str, Distribution]:
        # Exact mixing reads the full distributions; the top list is then only for show.
        k = 1 if self.exact and any(self.calls.values()) else self.method.top_logprobs
        found = {}
        for key, state in states.items():
            for name, distribution in zip(self.groups[key], state.next(top_logprobs=k)):
                found[name] = distribution
                self.calls[name] += 1
        return found

    def choose(self, found: Mapping[str, Distribution]) -> tuple[Token | int, bool]:
        """The next token (an id when exact, else a Token, known by its text) and whether the
        base would have taken another."""
        base = found["base"]
        if self.exact:
            scores = self.method.mix_full({name: d.full for name, d in found.items()})
            token_id = int(choose(torch.from_numpy(scores)[None], self.sampling, self.rng)[0])
            return token_id, token_id != int(np.argmax(base.full))
        texts, scores, fallback = self.method.mix_top({name: _by_text(d.top) for name, d in found.items()})
        self.fallbacks += fallback
        index = int(choose(torch.tensor([scores], dtype=torch.float64), self.sampling, self.rng)[0])
        return Token(texts[index], scores[index]), texts[index] != base.top[0].text

    def ends(self, token: Token | int) -> bool:
        probe = Token("", 0.0, token) if isinstance(token, int) else token
        return any(p.model.is_end(probe) for p in self.models.values())

    def run(self) -> MixingResult:
        with ExitStack() as stack:
            states = {key: stack.enter_context(self.models[names[0]].model.open(
                          [self.prompts[name].text for name in names]))
                      for key, names in self.groups.items()}
            base_key = id(self.models["base"].model)
            base_row = self.groups[base_key].index("base")

            def text() -> str:
                return states[base_key].texts[base_row]

            # Nothing has been written yet: a failure here is raised, not a partial answer.
            found = self.distributions(states)
            full = [d.full is not None for d in found.values()]
            if any(full) and not all(full):
                raise ModelError(f"{self.method.name} mixes either local models (exact) or served models "
                                 "(top-k approximation), not both in one call")
            self.exact = all(full)
            tokens, stop_reason, error = 0, "length", None
            try:
                while tokens < self.method.max_tokens:
                    token, steered = self.choose(found)
                    if self.ends(token):
                        stop_reason = "end"
                        break
                    before = text()
                    for key, state in states.items():
                        state.append([token] * len(self.groups[key]))  # free until a next()
                    tokens += 1
                    self.steered += steered
                    if self.on_text:
                        self.on_text(text()[len(before):], self.method.steering_role if steered else "base")
                    if tokens < self.method.max_tokens:
                        found = self.distributions(states)
            except ModelError as failure:
                stop_reason, error = "error", str(failure)
            answer = text()
        return self.method.result(
            text=answer, stop_reason=stop_reason, error=error, tokens=tokens, model_calls=self.calls,
            seconds=time.perf_counter() - self.started, exact=self.exact, steered_tokens=self.steered,
            prompts={name: p.text for name, p in self.prompts.items()},
            templates={name: p.template for name, p in self.prompts.items()},
            fallback_tokens=self.fallbacks)


def _by_text(top: Sequence[Token]) -> dict[str, float]:
    """A top list as text -> log-prob; of tokens sharing a text, the likeliest (listed first)."""
    found: dict[str, float] = {}
    for token in top:
        found.setdefault(token.text, token.logprob)
    return found


def proxy_scores(base: np.ndarray, tuned: Sequence[np.ndarray], untuned: Sequence[np.ndarray],
                 alphas: Sequence[float]) -> np.ndarray:
    """``base + Σ α_i (tuned_i − untuned_i)`` over the ids all of them cover (log-probs)."""
    width = min(a.shape[-1] for a in [base, *tuned, *untuned])
    scores = base[..., :width].astype(np.float64)
    for t, u, alpha in zip(tuned, untuned, alphas, strict=True):
        if alpha:
            scores = scores + alpha * (t[..., :width] - u[..., :width])
    return scores


def _approximate_proxy(lists: Sequence[dict[str, float]], alphas: Sequence[float]
                       ) -> tuple[list[str], list[float], bool]:
    """The top-K approximation over servers (docs/logit-arithmetic.md): ``lists`` are base, then tuned/untuned per pair."""
    base, pairs = lists[0], list(zip(lists[1::2], lists[2::2], alphas, strict=True))
    active = [(t, u, alpha) for t, u, alpha in pairs if alpha]
    shared = [text for text in base if all(text in t and text in u for t, u, _ in active)]
    if not shared:
        return list(base), list(base.values()), True
    scores = [base[text] + sum(alpha * (t[text] - u[text]) for t, u, alpha in active) for text in shared]
    return shared, scores, False


@register
@dataclass(kw_only=True)
class ProxyTuning(_Mixing):
    """``log p_base + Σ α_i (log p_tuned_i − log p_untuned_i)``, then the shared sampler."""

    name: ClassVar[str] = "proxy-tuning"
    summary: ClassVar[str] = "The base plus α × what tuning changed in a small model (logit arithmetic)."
    roles: ClassVar[tuple[Role, ...]] = (BASE, *[role for pair in PAIRS for role in pair])
    steering_role: ClassVar[str] = "tuned"

    alpha: list[float] | float = option([1.0], "Weight of each (tuned − untuned) pair: one value for "
                                               "every pair, or one per pair (comma-separated).")

    def check_roles(self, given: Collection[str]) -> None:
        pairs = 0
        for tuned, untuned in PAIRS:
            if (tuned.name in given) != (untuned.name in given):
                present, missing = (tuned, untuned) if tuned.name in given else (untuned, tuned)
                raise OptionError(missing.name, f"--{present.name} needs --{missing.name} too")
            pairs += tuned.name in given
        given_alphas = self._given_alphas()
        if len(given_alphas) not in (1, pairs):
            raise OptionError("alpha", f"give one value, or one per pair ({pairs}); got {len(given_alphas)}")

    def _given_alphas(self) -> list[float]:
        return list(self.alpha) if isinstance(self.alpha, list) else [self.alpha]

    def alphas(self, pairs: int) -> list[float]:
        """One α per pair: a single value given applies to every pair."""
        given = self._given_alphas()
        return given * pairs if len(given) == 1 else given

    def check(self) -> None:
        super().check()
        if isinstance(self.alpha, list) and not self.alpha:
            raise OptionError("alpha", "give at least one value")

    def _pairs(self, names: Collection[str]) -> list[tuple[str, str]]:
        return [(t.name, u.name) for t, u in PAIRS if t.name in names]

    def mix_full(self, full: Mapping[str, np.ndarray]) -> np.ndarray:
        pairs = self._pairs(full)
        return proxy_scores(full["base"], [full[t] for t, _ in pairs], [full[u] for _, u in pairs],
                            self.alphas(len(pairs)))

    def mix_top(self, tops: Mapping[str, dict[str, float]]) -> tuple[list[str], list[float], bool]:
        pairs = self._pairs(tops)
        lists = [tops["base"], *[tops[name] for pair in pairs for name in pair]]
        return _approximate_proxy(lists, self.alphas(len(pairs)))

    def result(self, *, fallback_tokens: int, **fields) -> ProxyTuningResult:
        pairs = self._pairs(fields["prompts"])  # the roles that took part
        return ProxyTuningResult(method=self.name, alpha=self.alphas(len(pairs)),
                                 fallback_tokens=fallback_tokens, **fields)


@register
@dataclass(kw_only=True)
class EmulatedFineTuning(ProxyTuning):
    """EFT's up-scaling (Mitchell et al., 2023) is proxy-tuning's arithmetic: one method, two names."""

    name: ClassVar[str] = "eft"
    summary: ClassVar[str] = "Emulated fine-tuning: proxy-tuning under its other name (the same arithmetic)."


GUIDE = Role("guide", chat=True, help="The small chat model added in (chat prompt).",
             default="qwen2.5-coder-0.5b-instruct")


@register
@dataclass(kw_only=True)
class Ensemble(_Mixing):
    """The ensemble baseline: ``p_base + p_guide`` over the union of their top-K tokens."""

    name: ClassVar[str] = "ensemble"
    summary: ClassVar[str] = "Base and guide probabilities added over the union of their top-K (a baseline)."
    roles: ClassVar[tuple[Role, ...]] = (BASE, GUIDE)
    steering_role: ClassVar[str] = "guide"

    def mix_full(self, full: Mapping[str, np.ndarray]) -> np.ndarray:
        width = min(full["base"].shape[-1], full["guide"].shape[-1])
        base, guide = full["base"][:width].astype(np.float64), full["guide"][:width].astype(np.float64)
        union = np.zeros(width, dtype=bool)
        for logprobs in (base, guide):
            union[np.argpartition(-logprobs, min(self.top_logprobs, width) - 1)[: self.top_logprobs]] = True
        return np.where(union, np.logaddexp(base, guide), -np.inf)

    def mix_top(self, tops: Mapping[str, dict[str, float]]) -> tuple[list[str], list[float], bool]:
        base, guide = tops["base"], tops["guide"]
        texts = list(base) + [text for text in guide if text not in base]
        # A probability a server did not report counts as 0: log(0) = -inf.
        scores = [float(np.logaddexp(base.get(text, -math.inf), guide.get(text, -math.inf))) for text in texts]
        return texts, scores, False


__all__ = ["Ensemble", "EmulatedFineTuning", "MixingResult", "ProxyTuning", "ProxyTuningResult", "proxy_scores"]
