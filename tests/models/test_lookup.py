"""Tests for towline.models.lookup: drafts copied from where the text's last tokens came before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from towline.models.lookup import lookup_draft

tokens = st.lists(st.integers(0, 6), max_size=30)


@given(context=tokens, sources=st.lists(tokens, max_size=3), size=st.integers(0, 12))
def test_a_draft_is_at_most_size_tokens_each_seen_after_its_context(context, sources, size):
    draft = lookup_draft(context, sources, size=size)
    assert len(draft) <= size
    texts = [*sources, context]
    for i, token in enumerate(draft):
        before = list(context) + draft[:i]
        # Some earlier occurrence of the last two (or three) tokens was followed by this one.
        assert any(text[j:j + 2] == before[-2:] and text[j + 2] == token
                   for text in texts for j in range(len(text) - 2))


@given(pattern=st.lists(st.integers(0, 99), min_size=3, max_size=8, unique=True),
       cut=st.integers(0, 7), size=st.integers(1, 20))
def test_a_repeated_pattern_is_drafted_on(pattern, cut, size):
    cut = min(cut, len(pattern) - 1)
    context = pattern * 2 + pattern[:cut]
    expected = (pattern[cut:] + pattern * size)[:size]
    assert lookup_draft(context, [], size=size) == expected


def test_sources_come_before_the_context():
    context = [1, 2, 3, 9, 2, 3]
    assert lookup_draft(context, [], size=2) == [9, 2]
    assert lookup_draft(context, [[2, 3, 5]], size=2) == [5]  # and "3 5" was never followed
