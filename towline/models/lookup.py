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

LOOKUP_NGRAMS = (3, 2)
"""How many of the last tokens a draft is looked up by, longest first: one token alone
matches too often to be worth a forward pass over its draft."""


def lookup_draft(context: Sequence[int], sources: Sequence[Sequence[int]], *, size: int) -> list[int]:
    """Up to ``size`` tokens that followed the latest earlier occurrence of the last tokens of
    ``context``: in ``sources`` first (in their order), then in ``context`` itself. Where what
    followed runs out before ``size``, the draft goes on by looking up its own end.

    >>> lookup_draft([7, 1, 2], [[1, 2, 3], [2, 3, 4, 5]], size=4)  # 1 2 -> 3, then 2 3 -> 4 5
    [3, 4, 5]
    """
    draft: list[int] = []
    while len(draft) < size:
        found = _follows(list(context) + draft, sources, size - len(draft))
        if not found:
            break
        draft += found
    return draft


def _follows(context: list[int], sources: Sequence[Sequence[int]], size: int) -> list[int]:
    for n in LOOKUP_NGRAMS:
        if len(context) < n:
            continue
        tail = list(context[-n:])
        for source in [*sources, context]:
            # The latest occurrence that is followed by something (in the context, not the tail itself).
            for start in range(len(source) - n - 1, -1, -1):
                if source[start] == tail[0] and list(source[start:start + n]) == tail:
                    return list(source[start + n:start + n + size])
    return []
