"""Drafts by lookup: guess the next tokens by finding the last few tokens of the text so far
earlier on (in the prompt, the text itself, or texts the caller expects to be relevant) and
copying what followed them there. Prompt lookup decoding (Saxena, 2023) does this over the
prompt; nudging also offers the guide's proposal, which the base often goes on to write.

A draft costs no model: a backend that checks several tokens in one forward pass verifies it,
keeps the drafted tokens that equal its own greedy choices and drops the rest, so the output
is what plain greedy decoding gives.

>>> lookup_draft([5, 6, 7, 8, 5, 6], [], size=3)  # "5 6" came before, followed by "7 8 5"
[7, 8, 5]
>>> lookup_draft([1, 2, 3], [[9, 2, 3, 4, 4]], size=8)  # found in a source
[4, 4]
>>> lookup_draft([1, 2, 3], [[3, 1]], size=4)  # no earlier "2 3": nothing to draft
[]
"""

from __future__ import annotations

from collections.abc import Sequence

SHORTEST_MATCH = 2
"""Fewest last tokens a draft is looked up by: one token alone matches too often to be worth
a forward pass over its draft."""
LONGEST_MATCH = 16
"""Matches are compared back this far at most: longer ones are as good as certain."""


def lookup_draft(context: Sequence[int], sources: Sequence[Sequence[int]], *, size: int) -> list[int]:
    """Up to ``size`` tokens that followed the earlier occurrence (in ``sources`` or in
    ``context`` itself) that shares the longest run of tokens with the end of ``context``,
    at least two. Ties go to ``sources`` (in their order) before ``context``, and to later
    occurrences. Where what followed runs out before ``size``, the draft goes on by looking
    up its own end.

    >>> lookup_draft([7, 1, 2], [[1, 2, 3], [2, 3, 4, 5]], size=4)  # 1 2 -> 3, then 2 3 -> 4 5
    [3, 4, 5]
    >>> lookup_draft([5, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2], [], size=1)  # "5 1 2" -> 3 beats the later "1 2" -> 4
    [3]
    """
    draft: list[int] = []
    while len(draft) < size:
        found = _follows(list(context) + draft, sources, size - len(draft))
        if not found:
            break
        draft += found
    return draft


def _follows(context: list[int], sources: Sequence[Sequence[int]], size: int) -> list[int]:
    best, longest = [], SHORTEST_MATCH - 1
    if len(context) < SHORTEST_MATCH:
        return best
    for source in [*sources, context]:
        # ``end``: where what followed an occurrence starts (in the context, never its own end).
        for end in range(len(source) - 1, SHORTEST_MATCH - 1, -1):
            if source[end - 1] != context[-1]:
                continue
            length = 1
            while (length < min(end, len(context), LONGEST_MATCH)
                   and source[end - 1 - length] == context[-1 - length]):
                length += 1
            if length > longest:
                best, longest = list(source[end:end + size]), length
    return best
