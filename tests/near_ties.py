"""Holding two numeric implementations of one model to each other, up to a near-tie.

towline runs a GGUF model two ways: a llama.cpp server computes with the quantized weights
and its own kernels (8-bit activations in its matrix products, code paths picked for the
CPU it was built on), and the local backend runs transformers in fp32 on the same weights,
de-quantized. The two give one token log-probs that differ by 0.06 nats (median), 0.37
(99th percentile) and up to 0.5 (measured on 681 top-5 log-probs of gemma-3-270m and
SmolLM2-135M-Instruct answering GSM8K questions). Greedy decoding takes the argmax, so where
the two best tokens are closer than that the two implementations may take different
tokens, and their texts part ways from there: 5 of those 8 answers did within 24 tokens,
at gaps of 0.03 to 0.35 nats. Which near-ties break differently depends on the machine. A
threshold test, such as nudging's "top-1 probability >= gamma", can likewise fall on
different sides.

So tests compare the two runs call by call (:class:`Recorded` keeps every call's prompt and
the steps read) and assert that they agree up to their first difference and that this
difference is a near-tie under both implementations: :func:`assert_same_up_to_a_near_tie`.

:data:`NEAR_TIE_NATS` is 1 nat, for the gap between two tokens: each of their log-probs may
move by up to 0.5, the largest difference measured. A top-1 probability and a threshold are
a near-tie within half of it (only one log-prob moves). A real disagreement (a bug, a wrong
prompt, another model) shows gaps of several nats, or tokens not among the top five.

>>> from towline.models.base import Step, Token
>>> a = [Call(0, "p", (Step(Token("x", -0.5), (Token("x", -0.5), Token("y", -0.75))),))]
>>> b = [Call(0, "p", (Step(Token("y", -0.625), (Token("y", -0.625), Token("x", -0.6875))),))]
>>> first_difference((a, b))
Difference(order=0, prompt='p', before='', kind='token', a=('x', 0.25), b=('y', 0.0625))
>>> first_difference((a, a)) is None
True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass

from towline.models.base import Delegating, Model, Step

NEAR_TIE_NATS = 1.0
"""Most log-prob gap (nats) between two tokens that two implementations of one model may
order differently; half of it between a top-1 probability and a threshold (see above)."""

TOP_LOGPROBS = 5
"""Alternatives :class:`Recorded` asks for at every step, so a difference can be measured."""


@dataclass(frozen=True)
class Call:
    """One call to a model: its order among all recorded calls, its prompt and the steps read."""

    order: int
    prompt: str
    steps: tuple[Step, ...]


class Recorded(Delegating):
    """A model as it is, recording its ``complete`` and ``stream`` calls into ``calls``.

    Every call asks for :data:`TOP_LOGPROBS` alternatives (more than a method may ask for:
    that changes what is reported, not what is decoded). Recorders that share ``clock``
    number their calls in one sequence.
    """

    def __init__(self, model: Model, clock: itertools.count | None = None) -> None:
        super().__init__(model)
        self.clock = clock or itertools.count()
        self.calls: list[Call] = []

    def complete(self, prompts, *, top_logprobs=1, **kwargs):
        completions = self.model.complete(prompts, top_logprobs=max(top_logprobs, TOP_LOGPROBS), **kwargs)
        for prompt, completion in zip(prompts, completions):
            self.calls.append(Call(next(self.clock), prompt, tuple(completion.steps)))
        return completions

    def stream(self, prompt, *, top_logprobs=1, **kwargs) -> Generator[Step, None, None]:
        read: list[Step] = []
        self.calls.append(Call(next(self.clock), prompt, ()))
        index = len(self.calls) - 1
        with closing(self.model.stream(prompt, top_logprobs=max(top_logprobs, TOP_LOGPROBS), **kwargs)) as steps:
            for step in steps:
                read.append(step)
                self.calls[index] = Call(self.calls[index].order, prompt, tuple(read))
                yield step


@dataclass(frozen=True)
class Difference:
    """Where two runs first differ: in the call numbered ``order`` (prompt ``prompt``), at
    the step after the text ``before`` that both read. ``kind`` is ``"token"`` (they took
    different tokens) or ``"threshold"`` (the same token, but a top-1 probability on
    different sides of the threshold). ``a`` and ``b`` are each run's token there and its
    gap in nats: to the other run's token (``inf`` when that is not among its top
    alternatives), or between its top-1 probability and the threshold."""

    order: int
    prompt: str
    before: str
    kind: str
    a: tuple[str, float]
    b: tuple[str, float]

    def is_near_tie(self, tolerance: float = NEAR_TIE_NATS) -> bool:
        if self.kind == "threshold":  # one log-prob against a fixed value
            tolerance /= 2
        return self.a[1] <= tolerance and self.b[1] <= tolerance


def first_difference(*runs: tuple[Sequence[Call], Sequence[Call]],
                     threshold: float | None = None) -> Difference | None:
    """The first difference between two runs, given as one ``(calls_a, calls_b)`` pair per
    model; None when every call has the same prompt and the same steps (tokens, and sides
    of ``threshold``). Calls are compared in the order they were made, over all models:
    after a difference, later calls (of any model) may differ as a consequence.

    A call whose prompt differs with nothing different before it cannot be explained by a
    near-tie: that raises AssertionError, as does a call made by one run only."""
    pairs = [pair for calls_a, calls_b in runs for pair in itertools.zip_longest(calls_a, calls_b)]
    for call_a, call_b in sorted(pairs, key=lambda pair: (pair[0] or pair[1]).order):
        assert call_a is not None and call_b is not None, f"only one run made the call {call_a or call_b}"
        assert call_a.prompt == call_b.prompt, (
            f"call {call_a.order} has different prompts with nothing different before:\n"
            f"{call_a.prompt!r}\n{call_b.prompt!r}")
        before = ""
        for step_a, step_b in zip(call_a.steps, call_b.steps):
            token_a, token_b = step_a.token.text, step_b.token.text
            if token_a != token_b:
                return Difference(call_a.order, call_a.prompt, before, "token",
                                  (token_a, _gap(step_a, token_b)), (token_b, _gap(step_b, token_a)))
            if threshold is not None and (step_a.top1_prob >= threshold) != (step_b.top1_prob >= threshold):
                return Difference(call_a.order, call_a.prompt, before, "threshold",
                                  (token_a, abs(math.log(step_a.top1_prob / threshold))),
                                  (token_b, abs(math.log(step_b.top1_prob / threshold))))
            before += token_a
    return None


def assert_same_up_to_a_near_tie(*runs: tuple[Sequence[Call], Sequence[Call]], threshold: float | None = None,
                                 tolerance: float = NEAR_TIE_NATS) -> Difference | None:
    """Assert that the runs agree call by call up to their first difference, and that it is
    a near-tie (gaps within ``tolerance`` under both). Returns the difference, or None."""
    found = first_difference(*runs, threshold=threshold)
    assert found is None or found.is_near_tie(tolerance), f"not a near-tie: {found}"
    return found


def _gap(step: Step, other: str) -> float:
    """How far below its own token (in nats) a step puts ``other``; inf when not listed."""
    listed = {t.text: t.logprob for t in step.top}
    listed.setdefault(step.token.text, step.token.logprob)
    return step.token.logprob - listed[other] if other in listed else math.inf
