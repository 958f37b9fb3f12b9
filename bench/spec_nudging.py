"""Nudging written out plainly, rule by rule (docs/nudging.md), over the Model interface.

Every question to a model is one complete request for a full chunk: the guide is asked for
``guide_chunk`` tokens, the base for ``base_chunk`` tokens, and the rules then look at what
came back. towline's own implementation (``towline.methods.nudging``) reads the base a step
at a time and stops as soon as the rules have their answer; it must give the same rounds.
This module is the yardstick for that (tests/methods/test_nudging_spec.py) and the
full-chunk baseline of speed benchmarks, which is why it counts requests and tokens.

>>> import inspect
>>> list(inspect.signature(spec_nudging).parameters)[:4]
['base', 'guide', 'base_prompt', 'guide_prompt']
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from towline.methods.nudging import fit_tokens
from towline.models.base import Completion, Model, Step


@dataclass
class SpecRun:
    """What :func:`spec_nudging` found."""

    rounds: list[tuple[str, str]]
    """Each round's (nudging words, base text)."""
    text: str
    """The output after the final clean-up."""
    stop_reason: str
    guide_tokens: int
    """Output tokens that came from the guide, in base tokens."""
    base_tokens: int
    requests: dict[str, int] = field(default_factory=lambda: {"base": 0, "guide": 0})
    generated: dict[str, int] = field(default_factory=lambda: {"base": 0, "guide": 0})
    """Tokens each model generated over all its requests (the end of text not counted)."""
    base_tokens_needed: int = 0
    """Base tokens the rules had to look at: one per readiness question; for each chunk its
    tokens up to and including the first unsure one, and the rest only where rule (a)'s
    answer could change the output. An implementation that stops reading early reads this many."""
    phase_ends: Counter = field(default_factory=Counter)
    """What ended each base phase: ``"a"``, ``"c"`` (the rules), ``"unsure"``, ``"end"``
    (the base's end of text), ``"length"``."""


def spec_nudging(base: Model, guide: Model, base_prompt: str, guide_prompt: str, *,
                 gamma: float = 0.4, guide_chunk: int = 16, base_chunk: int = 16, max_tokens: int = 256,
                 max_rounds: int = 150, guide_stop: Sequence[str] = ()) -> SpecRun:
    """Answer with ``base`` nudged by ``guide`` (greedy), given each model's prompt.

    ``guide_stop``: stop strings for the guide (its template's end of turn).
    """
    run = SpecRun(rounds=[], text="", stop_reason="", guide_tokens=0, base_tokens=0)
    out = ""

    def count(text: str) -> int:
        return base.count_tokens(text) if text else 0

    def room() -> int:
        return max_tokens - run.guide_tokens - run.base_tokens

    def ask(model: Model, role: str, prompt: str, tokens: int, stop: Sequence[str] = ()) -> Completion:
        run.requests[role] += 1
        (response,) = model.complete([prompt], max_tokens=tokens, stop=stop)
        run.generated[role] += len(response.steps)
        return response

    def add_words(words: str) -> tuple[str, bool]:
        """The budget: words that do not fit are cut to the longest prefix that does."""
        cut = count(words) > room()
        if cut:
            words = fit_tokens(words, room(), count)
        run.guide_tokens += count(words)
        return words, cut

    while True:
        if len(run.rounds) >= max_rounds:
            run.stop_reason = "rounds"
            break

        # Step 1: the guide proposes.
        proposal = ask(guide, "guide", guide_prompt + out, guide_chunk, guide_stop)
        if proposal.finish_reason in ("end", "stop"):
            words, cut = add_words(proposal.text)
            out += words
            run.rounds.append((words, ""))
            run.stop_reason = "length" if cut else "guide_stop"
            break

        # Step 2: accept guide words until the base is ready.
        body = proposal.text.lstrip(" ")
        w = body.split(" ")
        w[0] = proposal.text[: len(proposal.text) - len(body)] + w[0]
        n = len(w)
        words = None  # the nudging words
        ready = None  # the base's response where it was ready, when it has a first token
        for i in range(1, n):
            if w[i] == "":  # not asked about; accepted unless it is the last word
                continue
            response = ask(base, "base", base_prompt + out + " ".join(w[:i]), base_chunk)
            run.base_tokens_needed += min(len(response.steps), 1)
            if not response.steps:  # its end of text: ready, and no base phase
                words = " ".join(w[:i])
                break
            token = response.steps[0]
            if (" " + w[i]).startswith(token.token.text) or token.top1_prob >= gamma:
                words, ready = " ".join(w[:i]), response
                break
        if words is None:  # a one-word proposal, or never ready: the last word is left out
            words = w[0] if n == 1 else " ".join(w[: n - 1])

        # Step 4's repeated nudging: the same words a fourth round in a row are not appended.
        if len(run.rounds) >= 3 and all(r[0] == words for r in run.rounds[-3:]):
            run.stop_reason = "repeated_nudging"
            break
        words, cut = add_words(words)
        out += words

        # Step 3: the base continues.
        base_text = ""
        if ready is not None and not cut and room() > 0:
            base_text = ready.steps[0].token.text  # kept whatever follows
            run.base_tokens += 1
            chunk, ended = ready.steps[1:], ready.finish_reason == "end"
            while room() > 0:
                if len(chunk) > room():  # the budget ends the chunk early
                    chunk, ended = chunk[: room()], False
                texts = [s.token.text for s in chunk]
                unsure = next((k for k, s in enumerate(chunk) if s.top1_prob < gamma), len(chunk))
                accepted = "".join(texts[:unsure])
                run.base_tokens_needed += _needed(chunk, unsure, accepted, base_text)
                if "".join(texts) in base_text:  # (a)
                    run.phase_ends["a"] += 1
                    break
                if len(accepted.split(" ")) > 5 and accepted in out + base_text:  # (c)
                    run.phase_ends["c"] += 1
                    break
                base_text += accepted  # (d)
                run.base_tokens += unsure
                if unsure < len(chunk) or ended:
                    run.phase_ends["unsure" if unsure < len(chunk) else "end"] += 1
                    break
                if room() > 0:
                    response = ask(base, "base", base_prompt + out + base_text, base_chunk)
                    chunk, ended = response.steps, response.finish_reason == "end"
            else:
                run.phase_ends["length"] += 1
        out += base_text
        run.rounds.append((words, base_text))
        if cut or room() <= 0:
            run.stop_reason = "length"
            break

    # Step 5: the final clean-up.
    run.text = _strip_repeats(out)
    return run


def _needed(chunk: list[Step], unsure: int, accepted: str, base_text: str) -> int:
    """Tokens of ``chunk`` the rules need (see :attr:`SpecRun.base_tokens_needed`). Past the
    unsure token, (a) fires only if the accepted text is in the round's base text; and when
    that text is empty or long enough for (c), the round ends with nothing added either way."""
    if unsure == len(chunk):
        return len(chunk)
    if accepted and accepted in base_text and len(accepted.split(" ")) <= 5:
        return len(chunk)
    return unsure + 1


def _strip_repeats(text: str) -> str:
    """Repeatedly strip a suffix of at least 30 characters that immediately repeats the text before it."""
    while True:
        length = next((m for m in range(len(text) // 2, 29, -1) if text[-m:] == text[-2 * m: -m]), 0)
        if not length:
            return text
        text = text[:-length]
