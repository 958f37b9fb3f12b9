"""Choosing the next token: temperature, top-k and top-p warping, then greedy or a random draw.

One implementation for the local backend and for every method that mixes or samples
distributions itself (logit arithmetic, beam search). Works on a batch of rows of raw
scores (logits or log-probs: both give the same warped distribution).

>>> import torch
>>> scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
>>> warp(scores, Sampling(temperature=1.0, top_k=2)).softmax(-1).round(decimals=3)
tensor([[0.6250, 0.3750, 0.0000]])
>>> choose(scores, Sampling()).tolist()  # greedy
[0]
"""

from __future__ import annotations

import torch

from towline.models.base import SEED_LIMIT, Sampling


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, top-k and top-p applied to raw scores over the last dimension; tokens
    cut off get ``-inf``. Greedy sampling leaves the scores as they are."""
    if sampling.greedy:
        return scores
    scores = scores / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if sampling.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the best always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -torch.inf)
    return scores


def generator(sampling: Sampling) -> torch.Generator | None:
    """The random stream of a sampled decoding: seeded when ``sampling.seed`` is set, else
    fresh; None for greedy decoding, which draws nothing."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else int(torch.seed() % SEED_LIMIT)
    return torch.Generator().manual_seed(seed)


def choose(scores: torch.Tensor, sampling: Sampling, rng: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from raw scores: the argmax for greedy decoding, else a draw from
    the warped distribution using ``rng`` (see :func:`generator`)."""
    return choose_with_logprobs(scores, sampling, rng)[0]


def choose_with_logprobs(scores: torch.Tensor, sampling: Sampling,
                         rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose`, and the warped log-probs the tokens were chosen from (to report them).

    >>> ids, logprobs = choose_with_logprobs(torch.tensor([[1.0, 3.0]]), Sampling())
    >>> ids.tolist(), [round(p, 2) for p in logprobs.exp()[0].tolist()]
    ([1], [0.12, 0.88])
    """
    logprobs = torch.log_softmax(warp(scores, sampling), dim=-1)
    if sampling.greedy:
        # The argmax of the scores themselves: a log-softmax can round near-ties together.
        return scores.argmax(-1), logprobs
    return draw(logprobs, sampling, rng), logprobs


def draw(logprobs: torch.Tensor, sampling: Sampling, rng: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from already-warped log-probs (what :func:`choose` does after
    warping; for callers that also report the warped distribution).

    With top-k, the draw is among the k best, best first: top-k gave the others no chance,
    and a draw costs what its row is long (over a 262k vocabulary, 20 ms for 4 rows). So a
    caller that holds only the k best (a server's top log-probs, a beam search's candidates)
    draws what a caller holding the whole vocabulary draws with the same random stream.
    """
    if sampling.greedy:
        return logprobs.argmax(-1)
    if sampling.top_k:
        best = logprobs.topk(min(sampling.top_k, logprobs.shape[-1]), dim=-1)
        return best.indices.gather(-1, torch.multinomial(best.values.exp(), 1, generator=rng)).squeeze(-1)
    return torch.multinomial(logprobs.exp(), 1, generator=rng).squeeze(-1)
