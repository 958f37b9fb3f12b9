"""Tests for towline.models.local_merged: several answers' rows in one forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from towline.models.local import LocalModel
from towline.models.local_merged import Feed, MergedRow, forward_feeds

TOLERANCE = 1e-3
"""Logits of one row computed in differently shaped passes differ in their last float32 bits."""

WINDOWED_LENGTH = 10
"""Rows of the tiny sliding-window model (window 12) stay this short: within the window,
rolling back is exact."""


def feed_of(ids: list[int], cache, cached: int, keep: int) -> Feed:
    """New tokens ``ids`` for a row with ``cached`` tokens in ``cache`` (None: no tokens yet)."""
    return Feed(torch.tensor([ids]), torch.ones(1, cached + len(ids), dtype=torch.long),
                torch.arange(cached, cached + len(ids))[None], cache, keep)


def alone(model: LocalModel, ids: list[int]):
    """A cache of its own holding ``ids``; None for no tokens."""
    return model._forward_one(feed_of(ids, None, 0, 1))[1] if ids else None


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_merged_passes_give_each_row_what_passes_of_its_own_give(tiny_base, windowed, data):
    """Rows start with caches of different lengths (some none) and are, pass after pass, fed
    different numbers of tokens (keeping different numbers of logits), rolled back, or left
    out. Merged, each row's logits are those of the same steps on a cache of its own, whether
    the pass kept a merged cache or copied rows into a new one; a sliding-window model too."""
    model = data.draw(st.sampled_from([tiny_base, windowed]), label="model")
    limit = WINDOWED_LENGTH if model is windowed else 40
    token = st.integers(100, 3000)
    starts = data.draw(st.lists(st.lists(token, max_size=6), min_size=2, max_size=4), label="prompts")
    merged = [alone(model, ids) for ids in starts]
    own = [alone(model, ids) for ids in starts]
    lengths = [len(ids) for ids in starts]
    for _ in range(data.draw(st.integers(1, 5), label="passes")):
        fed = {}
        for row, length in enumerate(lengths):
            action = data.draw(st.sampled_from(["feed", "feed", "roll back", "wait"]), label="action")
            room = limit - length
            if action == "feed" and room > 0:
                ids = data.draw(st.lists(token, min_size=1, max_size=min(4, room)), label="ids")
                fed[row] = (ids, data.draw(st.integers(1, len(ids)), label="keep"))
            elif action == "roll back" and length > 1:
                count = data.draw(st.integers(1, min(3, length - 1)), label="rolled back")
                merged[row].crop(-count)
                own[row].crop(-count)
                lengths[row] -= count
        if not fed:
            continue
        rows = sorted(fed)
        results = forward_feeds(model, [feed_of(fed[r][0], merged[r], lengths[r], fed[r][1]) for r in rows])
        for row, (logits, cache) in zip(rows, results):
            expected, own[row] = model._forward_one(feed_of(fed[row][0], own[row], lengths[row], fed[row][1]))
            torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0)
            merged[row] = cache
            lengths[row] += len(fed[row][0])


def test_the_same_rows_again_run_on_the_kept_merged_cache(tiny_base):
    """A second pass of the same rows copies nothing: it runs on the merged cache the first
    left, where the narrower row's padding and a rolled-back token are masked holes."""
    caches = [alone(tiny_base, [300, 301, 302]), alone(tiny_base, [400])]
    first = forward_feeds(tiny_base, [feed_of([303], caches[0], 3, 1), feed_of([401, 402, 403], caches[1], 1, 3)])
    rows = [cache for _, cache in first]
    assert all(isinstance(row, MergedRow) for row in rows) and rows[0].merged is rows[1].merged
    assert rows[0].columns == [0, 1, 2, 3] and rows[1].columns == [2, 3, 4, 5]  # left-padded, then fed
    kept = copy.deepcopy(rows[1])
    rows[1].crop(-1)  # rolls back 403
    assert kept.columns == [2, 3, 4, 5]  # a copy is a row of its own
    second = forward_feeds(tiny_base, [feed_of([304], rows[0], 4, 1), feed_of([404], rows[1], 3, 1)])
    assert [cache.merged for _, cache in second] == [rows[0].merged] * 2
    assert second[1][1].columns == [2, 3, 4, 6]  # 5 is a hole now
    expected = tiny_base._forward_one(feed_of([404], alone(tiny_base, [400, 401, 402]), 3, 1))[0]
    torch.testing.assert_close(second[1][0], expected, atol=TOLERANCE, rtol=0)


def test_a_merge_reaching_past_a_sliding_window_runs_each_row_alone(windowed):
    """Rows of 9 and 8 tokens fed 2: 11 merged columns, at the window of 12; each row alone is
    exact, so neither is merged."""
    feeds = [feed_of([300, 301], alone(windowed, list(range(500, 500 + n))), n, 1) for n in (9, 8)]
    results = forward_feeds(windowed, feeds)
    assert not any(isinstance(cache, MergedRow) for _, cache in results)


def test_a_row_copied_out_of_a_merged_cache_continues_exactly(tiny_base):
    (_, row), _ = forward_feeds(tiny_base, [feed_of([300, 301], None, 0, 1), feed_of([400], None, 0, 1)])
    own = row.copy_out()
    assert own.get_seq_length() == 2
    expected = tiny_base._forward_one(feed_of([302], alone(tiny_base, [300, 301]), 2, 1))[0]
    torch.testing.assert_close(tiny_base._forward_one(feed_of([302], own, 2, 1))[0], expected, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="minus the tokens"):
        row.crop(1)
