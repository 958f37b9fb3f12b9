"""Nudging (Fei et al., arXiv 2410.09300): the base writes; where it is unsure, the guide
inserts a few words. Behaviour follows SPEC.md section 2 step by step.

The two models only ever exchange text, so they may have different tokenizers. The base is
read through :meth:`Model.stream`: asking "what is your next token?" costs one decoding
step, and when the answer is "ready", the same stream goes on to produce the base's text.

>>> split_words("  The answer  is 4")
['  The', 'answer', '', 'is', '4']
>>> strip_repeated_suffix("Step one. " + "It repeats itself, again and again. " * 3)
'Step one. It repeats itself, again and again. '
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import ClassVar

from towline.methods.base import (BASE, GUIDE, Method, OnText, Participant, Result, Role, between, option, positive,
                                  register)
from towline.models.base import GREEDY, SEED_LIMIT, Model, Sampling, Step
from towline.prompts import PromptRequest

REPEATED_CHUNK_MIN_WORDS = 5
"""A repeated base chunk is dropped only when it has more than this many words."""
REPEATED_SUFFIX_MIN_CHARS = 30
REPEATED_NUDGE_ROUNDS = 3


@dataclass
class Round:
    nudging_words: str
    base_text: str = ""


@dataclass(kw_only=True)
class NudgingResult(Result):
    rounds: list[Round]
    guide_tokens: int
    """Output tokens that came from the guide, counted in base tokens."""
    base_tokens: int

    @property
    def nudging_words(self) -> list[str]:
        return [r.nudging_words for r in self.rounds]

    @property
    def guide_token_fraction(self) -> float:
        """Share of the output's tokens (in base tokens) that came from the guide."""
        return self.guide_tokens / self.tokens if self.tokens else 0.0


@register
@dataclass(kw_only=True)
class Nudging(Method):
    """SPEC §2: the base writes; where its top-1 probability drops below ``gamma``, the guide
    inserts a few words."""

    name: ClassVar[str] = "nudging"
    summary: ClassVar[str] = "The base writes; where it is unsure, the guide inserts a few words."
    roles: ClassVar[tuple[Role, ...]] = (BASE, GUIDE)

    gamma: float = option(0.4, "Nudge where the base's top-1 probability is below gamma (0..1).")
    guide_chunk: int = option(16, "Tokens per guide proposal.")
    base_chunk: int = option(16, "Tokens per base chunk.")
    max_rounds: int = option(150, "Most nudging rounds.")

    def check(self) -> None:
        between(self, "gamma", 0.0, 1.0)
        positive(self, "guide_chunk", "base_chunk", "max_rounds")

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> NudgingResult:
        return _nudge(self, request, models["base"], models["guide"], on_text)


def split_words(proposal: str) -> list[str]:
    """Split on single spaces; leading spaces stay with the first word (SPEC §2 step 2)."""
    body = proposal.lstrip(" ")
    words = body.split(" ")
    words[0] = proposal[: len(proposal) - len(body)] + words[0]
    return words


def strip_repeated_suffix(text: str, *, min_chars: int = REPEATED_SUFFIX_MIN_CHARS) -> str:
    """Repeatedly drop a suffix of at least ``min_chars`` that immediately repeats the text
    before it."""
    stripped = True
    while stripped:
        stripped = False
        for length in range(len(text) // 2, min_chars - 1, -1):
            if text[-length:] == text[-2 * length : -length]:
                text = text[:-length]
                stripped = True
                break
    return text


def nudge(*, base: Model, guide: Model, request: PromptRequest | str, base_sampling: Sampling = GREEDY,
          guide_sampling: Sampling = GREEDY, base_template: str | None = None,
          guide_template: str | None = None, on_text: OnText | None = None, **options) -> NudgingResult:
    """Answer ``request`` with ``base`` nudged by ``guide``; ``options`` are :class:`Nudging`'s.

    ``on_text(piece, role)`` gets each round's guide words and base text as soon as they are done.
    """
    if isinstance(request, str):
        request = PromptRequest(question=request)
    return Nudging(**options).run(
        request, {"base": Participant(base, base_sampling, base_template),
                  "guide": Participant(guide, guide_sampling, guide_template)}, on_text=on_text)


def _nudge(options: Nudging, request: PromptRequest, base_part: Participant, guide_part: Participant,
           on_text: OnText | None) -> NudgingResult:
    gamma, guide_chunk, base_chunk = options.gamma, options.guide_chunk, options.base_chunk
    max_tokens, max_rounds = options.max_tokens, options.max_rounds
    base, guide = base_part.model, guide_part.model
    base_sampling, guide_sampling = base_part.sampling, guide_part.sampling
    started = time.perf_counter()
    base_prompt = base_part.prompt(request, chat=False, room=max_tokens, role="base")
    guide_prompt = guide_part.prompt(request, chat=True, room=max_tokens, role="guide")
    guide_stop = [guide_prompt.end_of_turn] if guide_prompt.end_of_turn else []
    calls = {"base": 0, "guide": 0}
    out = ""
    rounds: list[Round] = []
    guide_tokens = base_tokens = 0
    stop_reason = ""
    first = None

    @functools.cache
    def count_tokens(text: str) -> int:
        return base.count_tokens(text) if text else 0

    def base_stream(text: str, limit: int) -> Generator[Step, None, None]:
        calls["base"] += 1
        return base.stream(base_prompt.text + text, max_tokens=limit, top_logprobs=1,
                           sampling=_nth_call(base_sampling, calls["base"]))

    while not stop_reason:
        if len(rounds) >= max_rounds:
            stop_reason = "rounds"
            break
        # 1. The guide proposes.
        calls["guide"] += 1
        proposal = guide.complete([guide_prompt.text + out], max_tokens=guide_chunk,
                                  sampling=_nth_call(guide_sampling, calls["guide"]), stop=guide_stop)[0]
        if proposal.finish_reason in ("end", "stop"):
            this_round = Round(proposal.text)
            stop_reason = "guide_stop"
        else:
            # 2. Accept guide words until the base is ready.
            words = split_words(proposal.text)
            accepted, first = _accept_words(words, out, gamma, base_stream, base_chunk, count_tokens)
            this_round = Round(" ".join(accepted))
        out += this_round.nudging_words
        guide_tokens += count_tokens(this_round.nudging_words)
        if not stop_reason and guide_tokens + base_tokens >= max_tokens:
            stop_reason = "length"
        elif not stop_reason and first is not None:
            # 3. The base continues.
            stream, step = first
            this_round.base_text, produced, hit_budget = _base_phase(
                out, stream, step, gamma, base_stream, base_chunk, max_tokens - guide_tokens - base_tokens)
            out += this_round.base_text
            base_tokens += produced
            if hit_budget:
                stop_reason = "length"
        rounds.append(this_round)
        if on_text:
            on_text(this_round.nudging_words, "guide")
            on_text(this_round.base_text, "base")
        recent = [r.nudging_words for r in rounds[-REPEATED_NUDGE_ROUNDS:]]
        if not stop_reason and len(recent) == REPEATED_NUDGE_ROUNDS and len(set(recent)) == 1:
            stop_reason = "repeated_nudging"

    return NudgingResult(
        method=options.name,
        text=strip_repeated_suffix(out),
        stop_reason=stop_reason,
        rounds=rounds,
        guide_tokens=guide_tokens,
        base_tokens=base_tokens,
        tokens=guide_tokens + base_tokens,
        model_calls=calls,
        seconds=time.perf_counter() - started,
        prompts={"base": base_prompt.text, "guide": guide_prompt.text},
        templates={"base": base_prompt.template, "guide": guide_prompt.template},
    )


def _nth_call(sampling: Sampling, call: int) -> Sampling:
    """A seeded run stays repeatable, but each call draws fresh random numbers (reusing one
    seed for every call would give every call the same draws)."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=(sampling.seed + call) % SEED_LIMIT)


BaseStream = Callable[[str, int], Generator[Step, None, None]]


def _accept_words(words: list[str], out: str, gamma: float, base_stream: BaseStream,
                  base_chunk: int, count_tokens: Callable[[str], int],
                  ) -> tuple[list[str], tuple[Generator[Step, None, None], Step] | None]:
    """SPEC §2 step 2. Returns the nudging words and, when the base is ready and has a
    token, the open base stream with that first token.

    The words are counted before each stream opens: a server may serve one request at a
    time (llama.cpp cancels an open stream when another request arrives)."""
    accepted = [words[0]]
    for i in range(1, len(words)):
        if words[i] == "":
            accepted.append("")
            continue
        count_tokens(" ".join(accepted))
        stream = base_stream(out + " ".join(accepted), base_chunk)
        step = next(stream, None)
        if step is None:  # the base's answer here is its end of text: ready, no base phase
            return accepted, None
        agrees = (" " + words[i]).startswith(step.top[0].text if step.top else step.token.text)
        if agrees or step.top1_prob >= gamma:
            return accepted, (stream, step)
        stream.close()
        if i < len(words) - 1:
            accepted.append(words[i])
    return accepted, None


def _base_phase(out: str, stream: Generator[Step, None, None], first: Step, gamma: float, base_stream: BaseStream,
                base_chunk: int, budget: int) -> tuple[str, int, bool]:
    """SPEC §2 step 3 with the repetition guards of step 5. Returns the base text, its
    number of tokens, and whether the length budget was reached."""
    round_text = ""
    produced = 0
    pending: Step | None = first
    limit = min(base_chunk, budget)
    while True:
        pieces: list[str] = []
        unsure = False
        with closing(stream):
            if pending is not None:  # the round's first token is taken unconditionally
                pieces.append(pending.token.text)
                pending = None
            while len(pieces) < limit:
                step = next(stream, None)
                if step is None:  # the base's end of text
                    break
                if step.top1_prob < gamma:
                    unsure = True
                    break
                pieces.append(step.token.text)
        chunk = "".join(pieces)
        if chunk and (chunk in round_text or
                      (len(chunk.split()) > REPEATED_CHUNK_MIN_WORDS and chunk in out + round_text)):
            break
        round_text += chunk
        produced += len(pieces)
        budget -= len(pieces)
        if budget <= 0:
            return round_text, produced, True
        if unsure or len(pieces) < limit:
            break
        limit = min(base_chunk, budget)
        stream = base_stream(out + round_text, limit)
    return round_text, produced, False


