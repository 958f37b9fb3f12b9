"""Forward passes of several answers merged into one, on local weights.

Answers run together (:mod:`towline.models.together`) each decode a single row with a cache of
its own; when they all wait on one model, :func:`forward_feeds` runs their waiting feeds as
few batched passes. Rows of similar widths share a pass: each cache is left-padded to the
longest and each feed right-padded to the widest, so a row's real tokens stay in order.

The merged cache is kept: each row gets back a :class:`MergedRow`, its columns in that cache,
in place of a cache of its own. When the same answers come back together (a guide's proposal
is a token a pass for every answer at once), their next pass runs on the merged cache as it
is, with no copying: columns a row did not fill (it was fed fewer tokens than the widest, or
rolled back) are holes its attention mask hides. Other meetings copy the rows they need into
a new merged cache. A sliding window (Gemma 3) spans columns, holes included, so merged
caches stay within it; past it, rows run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from towline.models.local import LocalModel

PADDING_LIMIT = 32
"""Most padding columns, summed over rows, that merging a feed into a pass may add: on a CPU a
pass over a few dozen more tokens costs about what another pass costs (measured over 8
answers: 16 and 32 alike, merging every width 13 to 19% slower)."""

HOLES_LIMIT = 64
"""Hole columns a kept merged cache may gather beyond its longest row's length before its
rows are copied into a compact one (holes cost attention and memory)."""


@dataclass
class Feed:
    """New columns ``ids`` to run on top of ``cache``; ``mask`` covers the cached columns and
    the new ones. The logits of the last ``keep`` columns are wanted."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object
    keep: int

    @property
    def mergeable(self) -> bool:
        """One row with no holes: :func:`forward_feeds` can merge it with others."""
        return self.ids.shape[0] == 1 and bool(self.mask.all())

    @property
    def cached(self) -> int:
        return self.mask.shape[-1] - self.ids.shape[-1]

    @property
    def width(self) -> int:
        return self.ids.shape[-1]


class MergedCache:
    """A batched KV cache of several answers' rows that only grows: ``columns`` wide."""

    def __init__(self, cache, rows: int, columns: int, config) -> None:
        self.cache = cache
        self.rows = rows
        self.columns = columns
        self.config = config
        self.intact = True
        """False once a pass on it failed: its layers may have grown unevenly (the columns
        its rows had stay valid, so they can still be copied out)."""


class MergedRow:
    """One row of a :class:`MergedCache` in place of a single row's cache: ``columns`` are its
    tokens' columns, in order. Cropping drops columns from the row, not from the cache."""

    def __init__(self, merged: MergedCache, row: int, columns: list[int]) -> None:
        self.merged = merged
        self.row = row
        self.columns = columns

    def crop(self, tokens_to_remove: int) -> None:
        """As ``DynamicCache.crop``: drop the last ``-tokens_to_remove`` tokens (a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove:
            del self.columns[tokens_to_remove:]

    def __deepcopy__(self, memo) -> MergedRow:
        return MergedRow(self.merged, self.row, list(self.columns))

    def copied_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values of this row alone (copies), one batch row each."""
        index = torch.tensor(self.columns, device=self.merged.cache.layers[0].keys.device)
        return [(layer.keys[self.row : self.row + 1].index_select(-2, index),
                 layer.values[self.row : self.row + 1].index_select(-2, index)) for layer in self.merged.cache.layers]

    def copy_out(self):
        """This row as a cache of its own (a copy)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.copied_layers(), config=self.merged.config)


def own_cache(cache):
    """``cache`` as a cache of its own: a :class:`MergedRow` is copied out, anything else kept."""
    return cache.copy_out() if isinstance(cache, MergedRow) else cache


def similar_widths(widths: Sequence[int]) -> list[list[int]]:
    """Indices of ``widths`` grouped for merged passes: narrowest first, each group growing
    while padding every member to its widest adds at most :data:`PADDING_LIMIT` columns.

    >>> similar_widths([1, 30, 1, 40, 2])
    [[0, 2, 4], [1, 3]]
    """
    groups: list[list[int]] = []
    for index in sorted(range(len(widths)), key=lambda i: widths[i]):
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * widths[index] - sum(widths[i] for i in group) - widths[index]
            if padded <= PADDING_LIMIT:
                group.append(index)
                continue
        groups.append([index])
    return groups


def forward_feeds(owner: LocalModel, feeds: list[Feed]) -> list[tuple[torch.Tensor, object]]:
    """Each feed's logits (of its last ``keep`` columns) and cache, in few passes: feeds of
    similar widths share one; a feed left alone, or one whose merge would reach past a
    sliding window, runs by itself."""
    results: dict[int, tuple[torch.Tensor, object]] = {}
    for group in similar_widths([feed.width for feed in feeds]):
        members = [feeds[i] for i in group]
        columns = max(f.cached for f in members) + max(f.width for f in members)
        if len(group) > 1 and owner._within_window(columns):
            rows = _kept_rows(owner, members) or _copied_rows(owner, members)
            results.update(zip(group, _forward_rows(owner, members, rows)))
        else:
            results.update((i, owner._forward_one(feeds[i])) for i in group)
    return [results[i] for i in range(len(feeds))]


def _kept_rows(owner: LocalModel, feeds: list[Feed]) -> list[MergedRow] | None:
    """The feeds' rows in the merged cache they all come from, when they are all of its rows
    and one more pass keeps it within any sliding window and not mostly holes; else None."""
    rows = [feed.cache for feed in feeds]
    if not all(isinstance(row, MergedRow) for row in rows):
        return None
    merged = rows[0].merged
    if not merged.intact or any(row.merged is not merged for row in rows):
        return None
    if sorted(row.row for row in rows) != list(range(merged.rows)):
        return None
    width = max(feed.width for feed in feeds)
    longest = max(len(row.columns) for row in rows)
    if not owner._within_window(merged.columns + width) or merged.columns > longest + HOLES_LIMIT:
        return None
    return rows


def _copied_rows(owner: LocalModel, feeds: list[Feed]) -> list[MergedRow]:
    """The feeds' caches copied into a new merged cache, left-padded to the longest."""
    from transformers import DynamicCache

    lengths = [feed.cached for feed in feeds]
    past = max(lengths)
    merged = MergedCache(None, len(feeds), past, owner.model.config)
    rows = [MergedRow(merged, i, list(range(past - length, past))) for i, length in enumerate(lengths)]
    if not past:
        return rows
    sources = [(feed.cache.copied_layers() if isinstance(feed.cache, MergedRow) else
                [(layer.keys, layer.values) for layer in feed.cache.layers]) if feed.cache is not None else None
               for feed in feeds]
    template = next(source for source in sources if source is not None)
    layers = []
    for index, (keys_like, values_like) in enumerate(template):
        keys = keys_like.new_empty(len(feeds), keys_like.shape[1], past, keys_like.shape[-1])
        values = values_like.new_empty(len(feeds), values_like.shape[1], past, values_like.shape[-1])
        for row, (source, length) in enumerate(zip(sources, lengths)):
            keys[row, :, : past - length] = 0  # masked, but never garbage (NaN times 0 is NaN)
            values[row, :, : past - length] = 0
            if length:
                keys[row, :, past - length :] = source[index][0][0]
                values[row, :, past - length :] = source[index][1][0]
        layers.append((keys, values))
    merged.cache = DynamicCache(ddp_cache_data=layers, config=owner.model.config)
    return rows


def _forward_rows(owner: LocalModel, feeds: list[Feed], rows: list[MergedRow]) -> list[tuple[torch.Tensor, MergedRow]]:
    """One pass over every row of a merged cache, row ``rows[i]`` fed ``feeds[i]``; each
    feed's logits and its row, now with the new columns."""
    merged = rows[0].merged
    width, start = max(feed.width for feed in feeds), merged.columns
    ids = torch.full((merged.rows, width), owner.pad_id, dtype=torch.long)
    mask = torch.zeros(merged.rows, start + width, dtype=torch.long)
    positions = torch.zeros(merged.rows, width, dtype=torch.long)
    for feed, row in zip(feeds, rows, strict=True):
        assert len(row.columns) == feed.cached, "a merged row out of step with its batch"
        ids[row.row, : feed.width] = feed.ids[0]
        mask[row.row, row.columns] = 1
        mask[row.row, start : start + feed.width] = 1
        positions[row.row] = feed.cached + torch.arange(width)
    # The first column any row wants logits for decides how many columns are kept.
    keep = width - min(feed.width - feed.keep for feed in feeds)
    try:
        logits, merged.cache = owner._forward_one(Feed(ids, mask, positions, merged.cache, keep))
    except BaseException:
        merged.intact = False
        raise
    merged.columns += width
    results = []
    for feed, row in zip(feeds, rows):
        end = keep - width + feed.width  # the row's last real column among the kept ones
        new_row = MergedRow(merged, row.row, row.columns + list(range(start, start + feed.width)))
        results.append((logits[row.row : row.row + 1, end - feed.keep : end], new_row))
    return results
