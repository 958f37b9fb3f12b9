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
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import asdict, dataclass, field

from towline.models.base import GREEDY, Model, Sampling, Step
from towline.prompts import PromptRequest, build_prompt

REPEATED_CHUNK_MIN_WORDS = 5
"""A repeated base chunk is dropped only when it has more than this many words."""
REPEATED_SUFFIX_MIN_CHARS = 30
REPEATED_NUDGE_ROUNDS = 3


@dataclass
class Round:
    nudging_words: str
    base_text: str = ""


@dataclass
class NudgingResult:
    text: str
    stop_reason: str
    """``guide_stop``, ``length``, ``rounds`` or ``repeated_nudging``."""
    rounds: list[Round]
    guide_tokens: int
    """Output tokens that came from the guide, counted in base tokens."""
    base_tokens: int
    model_calls: dict[str, int]
    seconds: float
    prompts: dict[str, str]
    templates: dict[str, str] = field(default_factory=dict)

    @property
    def nudging_words(self) -> list[str]:
        return [r.nudging_words for r in self.rounds]

    @property
    def tokens(self) -> int:
        return self.guide_tokens + self.base_tokens

    @property
    def guide_token_fraction(self) -> float:
        """Share of the output's tokens (in base tokens) that came from the guide."""
        return self.guide_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "stop_reason": self.stop_reason,
            "nudging_words": self.nudging_words,
            "rounds": [asdict(r) for r in self.rounds],
            "guide_token_fraction": self.guide_token_fraction,
            "tokens": self.tokens,
            "guide_tokens": self.guide_tokens,
            "base_tokens": self.base_tokens,
            "model_calls": self.model_calls,
            "seconds": self.seconds,
            "prompts": self.prompts,
            "templates": self.templates,
        }


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


def nudge(
    *,
    base: Model,
    guide: Model,
    request: PromptRequest | str,
    gamma: float = 0.4,
    guide_chunk: int = 16,
    base_chunk: int = 16,
    max_tokens: int = 256,
    max_rounds: int = 150,
    base_sampling: Sampling = GREEDY,
    guide_sampling: Sampling = GREEDY,
    base_template: str | None = None,
    guide_template: str | None = None,
    on_round: Callable[[Round], None] | None = None,
) -> NudgingResult:
    """Answer ``request`` with ``base`` nudged by ``guide``.

    ``on_round`` is called with each round as soon as it is done (for streaming display).
    """
    if guide_chunk < 1 or base_chunk < 1 or max_tokens < 1 or max_rounds < 1:
        raise ValueError("guide_chunk, base_chunk, max_tokens and max_rounds must be >= 1")
    if isinstance(request, str):
        request = PromptRequest(question=request)
    started = time.perf_counter()
    base_prompt = build_prompt(request, chat=False, template=base_template)
    guide_prompt = build_prompt(request, chat=True, template=guide_template, model_template=guide.chat_template)
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
        if on_round:
            on_round(this_round)
        recent = [r.nudging_words for r in rounds[-REPEATED_NUDGE_ROUNDS:]]
        if not stop_reason and len(recent) == REPEATED_NUDGE_ROUNDS and len(set(recent)) == 1:
            stop_reason = "repeated_nudging"

    return NudgingResult(
        text=strip_repeated_suffix(out),
        stop_reason=stop_reason,
        rounds=rounds,
        guide_tokens=guide_tokens,
        base_tokens=base_tokens,
        model_calls=calls,
        seconds=time.perf_counter() - started,
        prompts={"base": base_prompt.text, "guide": guide_prompt.text},
        templates={"base": base_prompt.template, "guide": guide_prompt.template},
    )


def _nth_call(sampling: Sampling, call: int) -> Sampling:
    """A seeded run stays repeatable, but each call draws fresh random numbers (reusing one
    seed for every call would give every call the same draws)."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + call)


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


