"""Offline answer checking: is a model's free-text answer right?

Each checker reads the answer the way a reader would: a stated final answer ("the answer is
B", "Answer: yes") wins; without one, the last answer-shaped mention counts. Numbers and
expressions are read and compared by ``math-verify``. A checker returns a :class:`Check`:
whether the answer is right, and what it took as the model's answer (None: it found none,
which counts as wrong).

Base models often go on after their answer with a made-up next question; :func:`answer_region`
cuts the text where the prompt's question prefix or system text comes back, and the runner
checks only that.

>>> answer_region("Answer: $16.\\nQuestion: How many eggs?\\nAnswer: 3", "Question: ")
'Answer: $16.'
>>> check_math("She makes 9 * 2 = $18 every day.", {"answer": "18"})
Check(correct=True, extracted='18', score=None)
>>> check_choice("The answer is (C).", {"question": "Q\\nA. x\\nB. y\\nC. z", "answer": "C",
...                                     "choices": ["x", "y", "z"]})
Check(correct=True, extracted='C', score=None)
>>> check_label("No, the coin is not heads up.", "no", YES_NO)
Check(correct=True, extracted='no', score=None)
>>> check_date("So today is 05/01/2021.", {"answer": "05/01/2021"})
Check(correct=True, extracted='05/01/2021', score=None)
>>> check_letters('The answer is "oyaa".', {"answer": "oyaa"})
Check(correct=True, extracted='oyaa', score=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

Row = dict[str, Any]

YES_NO = {"yes": ("yes",), "no": ("no",)}
TRUE_FALSE = {"true": ("true", "yes"), "false": ("false", "no")}
PLAUSIBLE = {"plausible": ("plausible",), "implausible": ("implausible", "not plausible")}
"""Gold label -> the words that state it (strategyqa's gold is true/false, but models answer
its yes/no questions with yes or no)."""

# "the answer is", "Answer:", "final answer: ", "the correct option is" ...
_ANCHOR = re.compile(r"\b(?:answer|option|choice)\b(?:\s+(?:is|would be|will be|should be))?\s*[:=]?\s*",
                     re.IGNORECASE)
_ANCHOR_REACH = 40
"""How far after an anchor ("the answer is") its answer may start, in characters."""


@dataclass(frozen=True)
class Check:
    """The verdict on one answer: ``correct``, the answer as read (``extracted``), and a
    graded ``score`` for tasks scored on a scale (sentiment)."""

    correct: bool
    extracted: str | None
    score: float | None = None


def answer_region(text: str, *markers: str) -> str:
    """``text`` up to where a new line starts with one of ``markers`` (the prompt's question
    prefix or system text: a base model inventing the next question), stripped.

    >>> answer_region("E. No.\\nAnswer the question by walking through the reasoning steps.\\nSubject: law",
    ...               "Question: ", "Answer the question by walking through the reasoning steps.")
    'E. No.'
    """
    cut = len(text)
    for marker in markers:
        marker = marker.strip()
        found = re.search(r"\n\s*" + re.escape(marker), text) if marker else None
        if found:
            cut = min(cut, found.start())
    return text[:cut].strip()


def _anchored(text: str, found: list[tuple[int, str]]) -> str | None:
    """Of the answers found at positions ``found``, the one stated right after the last
    anchor that has one."""
    anchors = [m.end() for m in _ANCHOR.finditer(text)]
    for end in reversed(anchors):
        after = [value for start, value in found if end <= start <= end + _ANCHOR_REACH]
        if after:
            return after[0]
    return None


def _pick(text: str, found: list[tuple[int, str]]) -> str | None:
    """The anchored answer if there is one, else the last one found."""
    if not found:
        return None
    return _anchored(text, found) or max(found)[1]


# -- numbers and expressions -------------------------------------------------------------

@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    import math_verify

    return math_verify.parse(gold)


def check_math(text: str, row: Row) -> Check:
    """The last number or expression of ``text`` (a ``\\boxed{}`` answer first) against the
    gold number, compared by value with ``math-verify``.

    >>> check_math("3 + 4 = 7 apples, so the answer is 7.", {"answer": "7"}).correct
    True
    >>> check_math("She has 1,250 dollars", {"answer": "1250"}).correct
    True
    >>> check_math("She has 12 apples.", {"answer": "7"})
    Check(correct=False, extracted='12', score=None)
    """
    import math_verify

    predicted = math_verify.parse(text)
    if not predicted:
        return Check(False, None)
    correct = math_verify.verify(_parse_gold(str(row["answer"])), predicted)
    return Check(bool(correct), str(predicted[-1]))


# -- multiple choice ---------------------------------------------------------------------

def _options(row: Row) -> tuple[list[str], list[str]]:
    texts = [str(t) for t in row.get("choices", [])]
    labels = row.get("labels") or [chr(ord("A") + i) for i in range(len(texts))]
    if not texts:  # a row of another schema: read the "X. text" lines of the question
        pairs = re.findall(r"^([A-Z0-9])\. (.+)$", row["question"], re.MULTILINE)
        labels, texts = [p[0] for p in pairs], [p[1].strip() for p in pairs]
    return [str(label) for label in labels], texts


def check_choice(text: str, row: Row) -> Check:
    """The option the answer picks, by its label (``B``, ``(B)``, ``B.``) or its text, against
    the gold label. Where the answer lists options (lines starting with two or more
    different labels), those lines are skipped.

    >>> row = {"question": "Q\\nA. 4\\nB. 8", "answer": "B", "choices": ["4", "8"]}
    >>> check_choice("A. 4\\nB. 8\\nThe answer is 8.", row)
    Check(correct=True, extracted='B', score=None)
    >>> check_choice("I think A) is right.", row).extracted
    'A'
    """
    labels, texts = _options(row)
    if not labels:
        raise ValueError(f"row {row.get('id')!r} has no options to choose from")
    label_group = "|".join(re.escape(label) for label in labels)
    listed = re.compile(rf"^\s*[\(\[]?({label_group})[\.\)\]]\s")
    if len({m.group(1) for line in text.splitlines() if (m := listed.match(line))}) > 1:
        # The answer lists options (recited or made up): a list chooses nothing. One option
        # line alone is how small models often state their choice, so it stays.
        text = "\n".join(line for line in text.splitlines() if not listed.match(line))
    by_label = [(m.start(1), m.group(1)) for m in
                re.finditer(rf"(?<![\w])[\(\[*]*({label_group})(?:[\.\):\]*]|(?=\s*$)|(?=\s+is\b))", text,
                            re.MULTILINE)]
    by_text = []
    for label, option in zip(labels, texts):
        by_text += [(m.start(), label) for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", text,
                                                            re.IGNORECASE)]
    picked = (_anchored(text, by_label) or _anchored(text, by_text) or _pick(text, by_label)
              or (by_text[0][1] if len({label for _, label in by_text}) == 1 else None))
    return Check(picked == str(row["answer"]), picked)


# -- labels: yes/no, true/false, plausible/implausible --------------------------------------

def check_label(text: str, gold: str, labels: dict[str, tuple[str, ...]]) -> Check:
    """The label the answer states (``labels`` maps each label to the words stating it; the
    longest wins where two overlap, so "not plausible" beats "plausible").

    >>> check_label("The statement is plausible. Answer: implausible", "implausible", PLAUSIBLE).extracted
    'implausible'
    >>> check_label("Yes. Cats can swim.", "false", TRUE_FALSE)
    Check(correct=False, extracted='true', score=None)
    """
    phrases = sorted(((p, label) for label, words in labels.items() for p in words), key=lambda x: -len(x[0]))
    pattern = re.compile("|".join(rf"\b{re.escape(p)}\b" for p, _ in phrases), re.IGNORECASE)
    label_of = {p.lower(): label for p, label in phrases}
    found = [(m.start(), label_of[m.group(0).lower()]) for m in pattern.finditer(text)]
    picked = _pick(text, found)
    return Check(picked == gold, picked)


# -- dates ---------------------------------------------------------------------------------

_NUMERIC_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_WORDED_DATE = re.compile(r"\b([A-Z][a-z]+\.? \d{1,2}(?:st|nd|rd|th)?,? \d{4})\b")


def _worded(text: str) -> str | None:
    cleaned = re.sub(r"(\d)(st|nd|rd|th)", r"\1", text).replace(",", "").replace(".", "")
    for layout in ("%B %d %Y", "%b %d %Y"):
        try:
            return datetime.strptime(cleaned, layout).strftime("%m/%d/%Y")
        except ValueError:
            continue
    return None


def check_date(text: str, row: Row) -> Check:
    """The date the answer states, as MM/DD/YYYY (``5/1/2021`` and ``May 1, 2021`` also
    count), against the gold date.

    >>> check_date("Today is May 1st, 2021.", {"answer": "05/01/2021"}).correct
    True
    """
    found = [(m.start(), f"{int(m.group(1)):02d}/{int(m.group(2)):02d}/{m.group(3)}")
             for m in _NUMERIC_DATE.finditer(text)]
    found += [(m.start(), value) for m in _WORDED_DATE.finditer(text) if (value := _worded(m.group(1)))]
    picked = _pick(text, found)
    return Check(picked == row["answer"], picked)


# -- last letters ----------------------------------------------------------------------------

def check_letters(text: str, row: Row) -> Check:
    """The letter string the answer states (a word, a quoted string, or letters joined by
    spaces, commas, dashes or plus signs: ``"o-y-a-a"``), case-insensitive, against the gold.

    >>> check_letters("The last letters are o, y, a and a, so we get oyaa.", {"answer": "oyaa"}).correct
    True
    >>> check_letters("The answer is o + y + a + a.", {"answer": "oyaa"}).extracted
    'oyaa'
    >>> check_letters("The answer is oya.", {"answer": "oyaa"}).correct
    False
    """
    spelled = r"(?P<spelled>[A-Za-z]\b(?:\s*(?:[-,+]|and)?\s*\b[A-Za-z]\b)+)"
    found = []
    for m in re.finditer(rf"(?<![\w']){spelled}|(?<![\w'])[A-Za-z]+(?![\w'])", text):
        word = m.group(0).lower()
        found.append((m.start(), re.sub(r"\band\b|[^a-z]", "", word) if m.group("spelled") else word))
    picked = _pick(text, found)
    return Check(picked == str(row["answer"]).lower(), picked)


# -- sentiment -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _sentiment():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def check_positive(text: str, row: Row) -> Check:
    """How positive the text is: VADER's compound score (-1 to 1) as ``score``; ``correct``
    when it is positive (> 0.05, VADER's own threshold).

    >>> check_positive("A wonderful, moving film.", {}).correct
    True
    """
    score = _sentiment().polarity_scores(text)["compound"]
    return Check(score > 0.05, "positive" if score > 0.05 else "not positive", score)
