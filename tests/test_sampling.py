"""towline.sampling: the one sampler behind the local backend and every method that mixes
distributions. Properties over random score vectors (hypothesis), then exact draws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from towline.models.base import Sampling
from towline.sampling import choose, draw, generator, warp

finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=32)
scores_rows = st.lists(finite, min_size=1, max_size=40).map(lambda xs: torch.tensor([xs]))
samplings = st.builds(
    Sampling,
    temperature=st.floats(0.05, 5.0),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    top_k=st.integers(0, 50),
    seed=st.integers(0, 2**63 - 1),
)


def kept(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    return torch.isfinite(warp(scores, sampling))


@settings(max_examples=200, deadline=None)
@given(scores=scores_rows, sampling=samplings)
def test_warp_keeps_the_best_token_and_drops_only_worse_ones(scores, sampling):
    keep = kept(scores, sampling)[0]
    row = scores[0]
    assert keep[row == row.max()].any()  # among tied best tokens, which ones a cut-off keeps is open
    if (~keep).any():
        assert row[keep].min() >= row[~keep].max()  # a cut-off never skips a better token


@settings(max_examples=200, deadline=None)
@given(scores=scores_rows, k=st.integers(1, 50), temperature=st.floats(0.05, 5.0))
def test_top_k_keeps_the_k_best(scores, k, temperature):
    keep = kept(scores, Sampling(temperature=temperature, top_k=k))[0]
    n = scores.shape[-1]
    assert int(keep.sum()) >= min(k, n)  # ties at the k-th score stay
    assert_tie_free = len(set(scores[0].tolist())) == n
    if assert_tie_free:
        assert int(keep.sum()) == min(k, n)


@settings(max_examples=200, deadline=None)
@given(scores=scores_rows, top_p=st.floats(0.01, 0.999), temperature=st.floats(0.05, 5.0))
def test_top_p_keeps_the_smallest_set_that_covers_p(scores, top_p, temperature):
    sampling = Sampling(temperature=temperature, top_p=top_p)
    probs = torch.softmax(scores[0].double() / temperature, dim=-1)
    keep = kept(scores, sampling)[0]
    mass = probs[keep].sum().item()
    weakest = probs[keep].min().item()
    # Without the weakest kept token the set falls short of p (so it is the smallest); with
    # it, p is covered. Float sums make the boundary fuzzy by a rounding error.
    assume(all(abs(mass - weakest * j - top_p) > 1e-5 for j in (0, 1)))
    assert mass - weakest < top_p
    assert mass >= top_p or keep.all()


@settings(max_examples=100, deadline=None)
@given(scores=scores_rows, sampling=samplings, shift=finite)
def test_logits_and_log_probs_warp_alike(scores, sampling, shift):
    """Adding a constant (logits vs log-probs of one distribution) changes nothing, where the
    addition keeps the scores apart (rounding can merge two nearly equal scores into a tie,
    and which of tied tokens a cut-off keeps is open)."""
    shifted = scores.double() + shift
    assume(shifted.unique().numel() == scores.double().unique().numel())
    a = torch.softmax(warp(scores.double(), sampling), dim=-1)
    b = torch.softmax(warp(shifted, sampling), dim=-1)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(scores=scores_rows, temperature=st.floats(0.05, 5.0))
def test_temperature_alone_divides_the_scores(scores, temperature):
    warped = torch.log_softmax(warp(scores.double(), Sampling(temperature=temperature)), dim=-1)
    torch.testing.assert_close(warped, torch.log_softmax(scores.double() / temperature, dim=-1))


@settings(max_examples=100, deadline=None)
@given(scores=scores_rows, sampling=samplings)
def test_draws_come_from_the_kept_tokens_and_repeat_with_the_seed(scores, sampling):
    rows = scores.repeat(8, 1)  # eight draws at once, one random stream
    first = choose(rows, sampling, generator(sampling))
    again = choose(rows, sampling, generator(sampling))
    assert first.tolist() == again.tolist()
    keep = kept(scores, sampling)[0]
    assert all(keep[i] for i in first.tolist())


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(finite, min_size=1, max_size=40).map(lambda xs: torch.tensor([xs, xs[::-1]])))
def test_greedy_takes_the_argmax_and_draws_nothing(scores):
    assert generator(Sampling()) is None
    assert warp(scores, Sampling()) is scores
    assert choose(scores, Sampling()).tolist() == scores.argmax(-1).tolist()


def test_draws_follow_the_warped_distribution():
    """20,000 seeded draws: every frequency within 1.5% of its probability (a fixed seed
    makes this exact, not a chance pass)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    scores = probs.log().unsqueeze(0).repeat(20_000, 1)
    for sampling, expected in [
        (Sampling(temperature=1.0, seed=1), probs),
        (Sampling(temperature=1.0, top_k=2, seed=2), torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65),
        (Sampling(temperature=1.0, top_p=0.75, seed=3), torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8),
        (Sampling(temperature=0.5, seed=4), probs**2 / (probs**2).sum()),
    ]:
        ids = choose(scores, sampling, generator(sampling))
        frequencies = torch.bincount(ids, minlength=len(probs)).double() / len(ids)
        torch.testing.assert_close(frequencies, expected.double(), atol=0.015, rtol=0)


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.integers(-300, 300), min_size=2, max_size=40, unique=True)  # no ties, also once warped
       .map(lambda xs: torch.tensor([xs, xs[::-1]]) / 10),
       k=st.integers(1, 40), top_p=st.sampled_from([1.0, 0.8]), seed=st.integers(0, 2**31))
def test_a_draw_among_the_listed_top_k_is_the_draw_over_the_whole_row(scores, k, top_p, seed):
    """What a beam search over a server's top log-probs relies on: holding only the k best,
    best first, draws what holding the whole vocabulary draws, with the same seed."""
    k = min(k, scores.shape[1])
    sampling = Sampling(temperature=0.8, top_k=k, top_p=top_p, seed=seed)
    best = scores.topk(k, dim=-1)
    among_listed = best.indices.gather(-1, choose(best.values, sampling, generator(sampling))[:, None])
    assert among_listed.squeeze(-1).tolist() == choose(scores, sampling, generator(sampling)).tolist()


def test_an_unseeded_generator_is_fresh_each_time():
    scores = torch.zeros(1, 1000)
    sampling = Sampling(temperature=1.0)
    draws = {tuple(choose(scores.repeat(4, 1), sampling, generator(sampling)).tolist()) for _ in range(3)}
    assert len(draws) == 3


def test_draw_uses_already_warped_log_probs():
    logprobs = torch.log(torch.tensor([[0.0, 1.0, 0.0]]))
    sampling = Sampling(temperature=2.0, seed=0)
    assert draw(logprobs, sampling, generator(sampling)).tolist() == [1]
    assert draw(logprobs, Sampling()).tolist() == [1]
    assert math.isinf(warp(logprobs, sampling)[0, 0])


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"seed": 2**63}, "seed must be between"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**bad)
