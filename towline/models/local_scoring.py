"""Incremental scoring on local weights: the :class:`~towline.models.base.ScoreState` of a
:class:`~towline.models.local.LocalModel`.

All rows live in one batched KV cache that only grows. Each :meth:`CachedScoring.score`
re-tokenizes every changed row's whole text (prompt + continuation; tokenizing is cheap, the
model is not), keeps the cached tokens up to the first one that differs, and feeds the rest
in one batched forward pass: a row that grew by a chunk costs that chunk. Re-tokenizing the
whole text is what makes the hand-off at a chunk boundary honest: when the new text merges
with the old last token (``" good"`` + ``"ness"`` -> ``" goodness"``), the cached tokens stop
matching there and the row is recomputed from that token, so the result is exactly what
scoring the whole text at once gives.

Tokens that are dropped stay in the cache as masked-out slots (a hole costs memory, never
attention), so dropping never copies the cache. Feeding starts one token before the first new
one, because the cache keeps keys and values, not the output distribution of its last
token. Sliding-window layers count their window in cache slots, so for models that have them
a state whose slots would outgrow the window starts over from the full texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from towline.models.base import ScoreState

if TYPE_CHECKING:
    from towline.models.local import LocalModel


class CachedScoring(ScoreState):
    """Rows of growing continuations scored on top of their cached prefixes.

    ``reuse=False`` starts every :meth:`score` from scratch, reading every row's prompt and
    continuation in full (still one batched pass): the baseline benchmarks compare against.
    """

    def __init__(self, model: LocalModel, prompts: Sequence[str], *, reuse: bool = True) -> None:
        self._model = model
        self._prompts = list(prompts)
        self._prompt_ids = [model.encode(p) for p in prompts]
        self._reuse = reuse
        layer_types = getattr(model.model.config, "layer_types", None) or ()
        self._window = (getattr(model.model.config, "sliding_window", None)
                        if "sliding_attention" in layer_types else None)
        self._reset()

    def _reset(self) -> None:
        rows = len(self._prompts)
        self._fed: list[list[int]] = [[] for _ in range(rows)]  # token ids held in the cache, in order
        self._slots: list[list[int]] = [[] for _ in range(rows)]  # the cache slot of each
        self._logprobs: list[list[float]] = [[] for _ in range(rows)]  # of each fed token (0.0 for the first)
        self._texts: list[str | None] = [None] * rows
        self._totals = [0.0] * rows
        self._mask = torch.zeros(rows, 0, dtype=torch.long)
        self._cache = None

    def score(self, continuations: Sequence[str]) -> list[float]:
        if len(continuations) != len(self._prompts):
            raise ValueError(f"{len(continuations)} continuations for {len(self._prompts)} rows")
        if not self._reuse:
            self._reset()
        elif self._cache is None and len(set(map(tuple, self._prompt_ids))) == 1 and len(self._prompts) > 1:
            self._prefill_shared_prompt()
        changed = [r for r, text in enumerate(continuations) if text != self._texts[r]]
        if not changed:
            return list(self._totals)
        targets = {r: self._model.encode(self._prompts[r] + continuations[r]) for r in changed}
        if self._window and self._mask.shape[1] + max(map(len, targets.values())) > self._window:
            self._reset()  # holes would shift a sliding window: read everything again
            changed = list(range(len(continuations)))
            targets = {r: self._model.encode(self._prompts[r] + continuations[r]) for r in changed}
        self._feed({r: self._drop_stale(r, targets[r]) for r in changed})
        for r in changed:
            # As Model.score: the continuation's tokens start where the prompt's own end.
            start = max(common_prefix_length(self._prompt_ids[r], targets[r]), 1)
            self._texts[r] = continuations[r]
            self._totals[r] = sum(self._logprobs[r][start:])
        return list(self._totals)

    def reorder(self, rows: Sequence[int]) -> None:
        index = list(rows)
        if self._cache is not None:
            self._cache.reorder_cache(torch.tensor(index, device=self._model.device))
        self._mask = self._mask[index]
        self._prompts = [self._prompts[i] for i in index]
        self._prompt_ids = [self._prompt_ids[i] for i in index]
        self._fed = [list(self._fed[i]) for i in index]
        self._slots = [list(self._slots[i]) for i in index]
        self._logprobs = [list(self._logprobs[i]) for i in index]
        self._texts = [self._texts[i] for i in index]
        self._totals = [self._totals[i] for i in index]

    def close(self) -> None:
        self._cache = None

    def _prefill_shared_prompt(self) -> None:
        """Every row starts with the same prompt: read it once and give each row a copy."""
        rows = len(self._prompts)
        self._fed, self._slots, self._logprobs = [[]], [[]], [[]]
        self._mask = torch.zeros(1, 0, dtype=torch.long)
        self._feed({0: (self._prompt_ids[0], 0.0)})
        self.reorder([0] * rows)

    def _drop_stale(self, row: int, target: list[int]) -> tuple[list[int], float]:
        """Mask out the cached tokens of ``row`` from the first that ``target`` does not share,
        and the last shared one too (the cache keeps no output distribution, so it is fed
        again to score the token after it). Returns what to feed and the log-prob of its first
        token (known already when that token was cached)."""
        shared = common_prefix_length(self._fed[row], target)
        keep = max(shared - 1, 0)
        first_logprob = self._logprobs[row][keep] if shared else 0.0
        for slot in self._slots[row][keep:]:
            self._mask[row, slot] = 0
        del self._fed[row][keep:], self._slots[row][keep:], self._logprobs[row][keep:]
        return target[keep:], first_logprob

    def _feed(self, feeds: dict[int, tuple[list[int], float]]) -> None:
        """One forward pass over each row's new tokens, right-padded (pads are masked out)."""
        rows = len(self._fed)
        width = max(len(ids) for ids, _ in feeds.values())
        first_slot = self._mask.shape[1]
        ids = torch.full((rows, width), self._model.pad_id, dtype=torch.long)
        new_mask = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for r, (new, _) in feeds.items():
            ids[r, : len(new)] = torch.tensor(new, dtype=torch.long)
            new_mask[r, : len(new)] = 1
        for r in range(rows):
            positions[r] = len(self._fed[r]) + torch.arange(width)
        self._mask = torch.cat([self._mask, new_mask], dim=-1)
        device = self._model.device
        with torch.inference_mode():
            out = self._model.model(input_ids=ids.to(device), attention_mask=self._mask.to(device),
                                    position_ids=positions.to(device), past_key_values=self._cache,
                                    use_cache=True)
            self._cache = out.past_key_values
            for r, (new, first_logprob) in feeds.items():
                # Output j predicts fed token j + 1 (one row at a time: a large vocabulary's
                # log-softmax over every row at once would take a lot of memory).
                logprobs = torch.log_softmax(out.logits[r, : len(new) - 1].float(), dim=-1)
                following = torch.tensor(new[1:], device=logprobs.device).unsqueeze(-1)
                self._fed[r].extend(new)
                self._slots[r].extend(range(first_slot, first_slot + len(new)))
                self._logprobs[r].extend([first_logprob, *logprobs.gather(-1, following).squeeze(-1).tolist()])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
