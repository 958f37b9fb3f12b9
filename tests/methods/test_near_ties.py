"""tests/near_ties.py: what counts as a near-tie, and what does not."""

from __future__ import annotations

import itertools
import math

import pytest
from near_ties import NEAR_TIE_NATS, Call, Recorded, assert_same_up_to_a_near_tie, first_difference

from towline.models.base import Step, Token


def step(token: str, logprob: float, *others: tuple[str, float]) -> Step:
    return Step(Token(token, logprob), (Token(token, logprob), *(Token(t, lp) for t, lp in others)))


def test_tokens_that_part_at_a_near_tie():
    a = [Call(0, "p", (step("x", -0.1), step("y", -0.7, ("z", -0.9))))]
    b = [Call(0, "p", (step("x", -0.1), step("z", -0.6, ("y", -1.2))))]
    found = assert_same_up_to_a_near_tie((a, b))
    assert (found.kind, found.before) == ("token", "x")
    assert found.a == ("y", pytest.approx(0.2)) and found.b == ("z", pytest.approx(0.6))


@pytest.mark.parametrize("other", [("z", -0.7 - NEAR_TIE_NATS - 0.01), ("w", -0.9)])
def test_tokens_that_part_far_apart_are_not_a_near_tie(other):
    a = [Call(0, "p", (step("y", -0.7, other),))]
    b = [Call(0, "p", (step("z", -0.6, ("y", -0.65)),))]
    found = first_difference((a, b))
    assert not found.is_near_tie()
    if other[0] != "z":  # z is not among a's alternatives: infinitely far
        assert found.a[1] == math.inf
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_same_up_to_a_near_tie((a, b))


def test_a_probability_on_either_side_of_a_threshold():
    a = [Call(0, "p", (step("x", math.log(0.42)),))]
    b = [Call(0, "p", (step("x", math.log(0.38)),))]
    assert first_difference((a, b)) is None  # no threshold, no difference
    found = assert_same_up_to_a_near_tie((a, b), threshold=0.4)
    assert found.kind == "threshold"
    far = [Call(0, "p", (step("x", math.log(0.9)),))]
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_same_up_to_a_near_tie((far, b), threshold=0.4)


def test_the_earliest_difference_over_two_models_explains_the_later_ones():
    # The base parts at call 1; the guide's call 2 then has another prompt, which is fine.
    base_a, base_b = [Call(1, "b", (step("x", -0.5, ("y", -0.6)),))], [Call(1, "b", (step("y", -0.5, ("x", -0.6)),))]
    guide_a, guide_b = [Call(0, "g", (step("s", -0.1),)), Call(2, "g x", ())], [Call(0, "g", (step("s", -0.1),)),
                                                                              Call(2, "g y", ())]
    found = first_difference((base_a, base_b), (guide_a, guide_b))
    assert (found.order, found.kind) == (1, "token")
    found = first_difference((guide_a, guide_b), (base_a, base_b))  # in either order
    assert found.order == 1


def test_different_prompts_with_nothing_before_are_no_near_tie():
    with pytest.raises(AssertionError, match="different prompts"):
        first_difference(([Call(0, "p", ())], [Call(0, "q", ())]))
    with pytest.raises(AssertionError, match="only one run"):
        first_difference(([Call(0, "p", ())], []))


def test_recorded_keeps_every_call_with_the_steps_read(tiny_base):
    clock = itertools.count()
    model = Recorded(tiny_base, clock)
    (completion,) = model.complete(["Hi"], max_tokens=3)
    stream = model.stream("Hi", max_tokens=3)
    first = next(stream)
    stream.close()
    assert [c.order for c in model.calls] == [0, 1]
    assert model.calls[0].steps == tuple(completion.steps)
    assert model.calls[1].steps == (first,) and first.token == completion.steps[0].token
    assert len(first.top) == 5  # alternatives asked for, to measure a difference
