"""Nudging's fast local path against its plain one, on real weights.

The fast path is the local backend's own: a KV cache reused across calls and drafts (the
guide's latest proposals, the text so far) checked several tokens a pass. Answers run
together (:meth:`Nudging.run_batch`, as evaluation runs them) are held to the same answers
each alone, the same way. The plain path
computes every call from scratch, a token a pass: what tests/methods/test_nudging_spec.py
holds to the rules. Both are greedy. Passes of other shapes round the last float32 bits
differently, so the two runs must agree call by call up to their first difference, and that
difference must be a near-tie (tests/near_ties.py); and the fast path must make fewer
forward passes.
"""

from __future__ import annotations

import itertools

import pytest
from near_ties import Recorded, assert_same_up_to_a_near_tie

from bench.common import Passes, request_for  # the speed benchmarks' request and pass count
from towline.methods.base import Participant
from towline.methods.nudging import Nudging, nudge
from towline.models.local import LocalModel

pytestmark = pytest.mark.real_models

GAMMA = 0.4
QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for "
    "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
    "does it take?",
]

THREE_QUESTIONS = [*QUESTIONS, "What is 12 + 30? Explain."]


def plain(model: LocalModel) -> LocalModel:
    return LocalModel(model.model, model.tokenizer, name=model.name, reuse_prefix=False, draft=False)


def assert_fast_path_is_plain_up_to_a_near_tie(base: LocalModel, guide: LocalModel, question: str,
                                               max_tokens: int) -> float:
    """Runs both paths; returns the fast path's share of the plain path's forward passes."""
    request = request_for(question)
    runs, passes = {}, {}
    for name, (b, g) in {"fast": (base, guide), "plain": (plain(base), plain(guide))}.items():
        clock = itertools.count()
        recorded = Recorded(b, clock), Recorded(g, clock)
        counter = Passes(base.model, guide.model)
        try:
            result = nudge(base=recorded[0], guide=recorded[1], request=request, gamma=GAMMA, max_tokens=max_tokens)
        finally:
            counter.remove()
        runs[name], passes[name] = (result, recorded), counter.count
    (fast, (fast_base, fast_guide)), (slow, (slow_base, slow_guide)) = runs["fast"], runs["plain"]
    difference = assert_same_up_to_a_near_tie((fast_base.calls, slow_base.calls), (fast_guide.calls, slow_guide.calls),
                                              threshold=GAMMA)
    if difference is None:
        assert [(r.nudging_words, r.base_text) for r in fast.rounds] == [
            (r.nudging_words, r.base_text) for r in slow.rounds]
        assert (fast.text, fast.stop_reason, fast.tokens) == (slow.text, slow.stop_reason, slow.tokens)
    else:
        print(f"parted at a near-tie: {difference}")
    return passes["fast"] / passes["plain"]


def assert_together_is_alone_up_to_a_near_tie(base: LocalModel, guide: LocalModel, questions: list[str],
                                              max_tokens: int) -> float:
    """Answers run together against each run alone, call by call up to a near-tie; returns
    the together run's share of the alone runs' forward passes."""
    method = Nudging(gamma=GAMMA, max_tokens=max_tokens)
    requests = [request_for(q) for q in questions]
    clock = itertools.count()
    shared = Recorded(base, clock), Recorded(guide, clock)
    counter = Passes(base.model, guide.model)
    try:
        together = method.run_batch(requests, {"base": Participant(shared[0]), "guide": Participant(shared[1])})
    finally:
        counter.remove()
    passes = {"together": counter.count, "alone": 0}
    for request, result in zip(requests, together, strict=True):
        clock = itertools.count()
        alone_models = Recorded(base, clock), Recorded(guide, clock)
        counter = Passes(base.model, guide.model)
        try:
            alone = method.run(request, {"base": Participant(alone_models[0]), "guide": Participant(alone_models[1])})
        finally:
            counter.remove()
        passes["alone"] += counter.count
        # This answer's calls among all answers': each model's prompt starts with this request's.
        own = [[c for c in model.calls if c.prompt.startswith(result.prompts[role])]
               for model, role in zip(shared, ("base", "guide"))]
        difference = assert_same_up_to_a_near_tie((own[0], alone_models[0].calls), (own[1], alone_models[1].calls),
                                                  threshold=GAMMA)
        if difference is None:
            assert (result.text, result.stop_reason, result.tokens) == (alone.text, alone.stop_reason, alone.tokens)
        else:
            print(f"parted at a near-tie: {difference}")
    return passes["together"] / passes["alone"]


def test_the_bundled_pair(gemma_base, smollm2_guide):
    """gemma-3-270m nudged by SmolLM2-135M-Instruct: the guide writes a third of the answer."""
    shares = [assert_fast_path_is_plain_up_to_a_near_tie(gemma_base, smollm2_guide, q, 48) for q in QUESTIONS]
    assert max(shares) < 0.7


def test_a_qwen_pair(qwen_base, qwen_small):
    """Qwen2.5-Coder-1.5B-Instruct on a plain prompt nudged by the 0.5B: one vocabulary."""
    share = assert_fast_path_is_plain_up_to_a_near_tie(qwen_base, qwen_small, QUESTIONS[1], 32)
    assert share < 0.85  # 0.74 here: the base writes nearly all of it, and drafts less of it


def test_the_bundled_pair_answers_together(gemma_base, smollm2_guide):
    """Three questions answered together, as ``towline eval --batch-size`` does: each answer
    is its answer alone, in fewer forward passes (calls of several answers share one)."""
    share = assert_together_is_alone_up_to_a_near_tie(gemma_base, smollm2_guide, THREE_QUESTIONS, 40)
    print(f"passes together / alone: {share:.2f}")
    assert share < 0.8


def test_a_qwen_pair_answers_together(qwen_base, qwen_small):
    share = assert_together_is_alone_up_to_a_near_tie(qwen_base, qwen_small, THREE_QUESTIONS, 24)
    print(f"passes together / alone: {share:.2f}")
    assert share < 0.8
