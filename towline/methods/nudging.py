"""Nudging (Fei et al., arXiv 2410.09300): the base writes; where it is unsure, the guide
inserts a few words. docs/nudging.md states the rules this module follows, step by step.

The two models only ever exchange text, so they may have different tokenizers. The base is
read through :meth:`Model.stream`: asking "what is your next token?" costs one decoding
step, and when the answer is "ready", the same stream goes on to produce the base's text.

>>> split_words("  The answer  is 4")
['  The', 'answer', '', 'is', '4']
>>> strip_repeated_suffix("Step one. " + "It repeats itself, again and again. " * 3)
'Step one. It repeats itself, again and again. '
>>> fit_tokens("one two three", 2, lambda text: len(text.split()))
'one two '
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import ClassVar

from towline.methods.base import (BASE, GUIDE, Method, OnText, Participant, Result, Role, between, option, positive,
                                  register)
from towline.models.base import GREEDY, SEED_LIMIT, Completion, Model, ModelError, Sampling, Step
from towline.models.together import run_together
from towline.prompts import PromptRequest

REPEATED_CHUNK_MIN_PIECES = 5
"""A base chunk already in the output is dropped when it has more than this many pieces
(``text.split(" ")``, empty pieces counted)."""
REPEATED_SUFFIX_MIN_CHARS = 30
"""The final clean-up strips immediate repeats of at least this many characters."""
REPEATED_NUDGE_ROUNDS = 4
"""The answer stops when the same nudging words would come this many rounds in a row."""
LOOKUP_PROPOSALS = 8
"""How many of the guide's latest proposals the models may draft from."""
PROPOSAL_SLACK = 2
"""With ``adapt_proposals``, a proposal is this many tokens longer than what the base needed
of the previous one."""


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
    generated: dict[str, int]
    """Tokens each model generated that this answer read (a stream stopped early counts
    what was read); over an API, what the servers were asked to generate, near enough."""
    token_counts: int
    """Texts counted in base tokens by the base model (over an API, a request each unless
    the model counts with its own tokenizer: see :class:`~towline.models.openai.OpenAIModel`)."""

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
    """The base writes; where its top-1 probability drops below ``gamma``, the guide inserts
    a few words (docs/nudging.md)."""

    name: ClassVar[str] = "nudging"
    summary: ClassVar[str] = "The base writes; where it is unsure, the guide inserts a few words."
    roles: ClassVar[tuple[Role, ...]] = (BASE, GUIDE)

    gamma: float = option(0.4, "Nudge where the base's top-1 probability is below gamma (0..1).")
    guide_chunk: int = option(16, "Tokens per guide proposal.")
    base_chunk: int = option(16, "Tokens per base chunk.")
    max_rounds: int = option(150, "Most nudging rounds.")
    adapt_proposals: bool = option(False, "Faster, off the rules: each guide proposal is as long as the base "
                                          f"needed of the last one, plus {PROPOSAL_SLACK} tokens, up to guide_chunk "
                                          "(docs/nudging.md).")

    def check(self) -> None:
        between(self, "gamma", 0.0, 1.0)
        positive(self, "guide_chunk", "base_chunk", "max_rounds")

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> NudgingResult:
        return _Run(self, request, models["base"], models["guide"], on_text).result()

    def run_batch(self, requests: Sequence[PromptRequest], models: Mapping[str, Participant]) -> list[Result]:
        """Answer the requests together where both models merge calls (local weights): each
        answer runs the rounds of :meth:`run` in turn, and whenever every answer waits on a
        model, the waiting calls run as one batch (:mod:`towline.models.together`). Each
        answer's ``seconds`` is its share of the whole."""
        if len(requests) < 2 or not all(p.model.merges_calls for p in models.values()):
            return super().run_batch(requests, models)
        started = time.perf_counter()
        results = run_together([functools.partial(self.run, request, models) for request in requests])
        seconds = (time.perf_counter() - started) / len(requests)
        return [dataclasses.replace(result, seconds=seconds) for result in results]


def split_words(proposal: str) -> list[str]:
    """Split on single spaces; leading spaces stay with the first word (docs/nudging.md, step 2)."""
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


def fit_tokens(text: str, room: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` (in characters) that is at most ``room`` tokens long.

    Whole words are bisected (one more word never means fewer tokens), then the next word
    is tried from its longest prefix down: within a word, a longer prefix can take fewer
    tokens (" cl" + "i" is two tokens where " clips" is one). Whatever a tokenizer does,
    what is returned fits.
    """
    if count_tokens(text) <= room:
        return text
    cuts = [i for i, char in enumerate(text) if char == " "] + [len(text)]  # prefixes ending before a space
    fits, too_long = -1, len(cuts) - 1  # cuts[fits] fits (-1: the empty prefix), cuts[too_long] does not
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if count_tokens(text[: cuts[middle]]) <= room:
            fits = middle
        else:
            too_long = middle
    start = cuts[fits] if fits >= 0 else 0
    return next((text[:end] for end in range(cuts[too_long] - 1, start, -1) if count_tokens(text[:end]) <= room),
                text[:start])


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


BaseStream = Generator[Step, None, None]


class _Run:
    """One answer: the state the rounds share, so that a model failing mid-answer leaves
    everything decided so far in the result."""

    def __init__(self, options: Nudging, request: PromptRequest, base: Participant, guide: Participant,
                 on_text: OnText | None) -> None:
        self.options = options
        self.base, self.guide = base, guide
        self.on_text = on_text
        self.started = time.perf_counter()
        # Prompts are checked against the models' contexts before any decoding.
        self.base_prompt = base.prompt(request, chat=False, room=options.max_tokens, role="base")
        self.guide_prompt = guide.prompt(request, chat=True, room=options.max_tokens, role="guide")
        self.calls = {"base": 0, "guide": 0}
        self.generated = {"base": 0, "guide": 0}
        self.token_counts = 0
        self.out = ""
        self.rounds: list[Round] = []
        self.guide_tokens = self.base_tokens = 0
        self.proposal_length = options.guide_chunk
        """Tokens to ask the guide for (less than ``guide_chunk`` only with ``adapt_proposals``)."""
        self.proposals: list[str] = []
        """The guide's latest proposals, newest first: both models often go on to write what
        they say, so a backend that drafts (:meth:`Model.stream`'s ``lookup``) drafts from them."""
        self.uncounted: str | None = None
        """Nudging words in the output whose tokens are not in ``guide_tokens`` yet (see
        :meth:`_surely_fits`)."""

        @functools.cache
        def count_tokens(text: str) -> int:
            if not text:
                return 0
            self.token_counts += 1
            return base.model.count_tokens(text)

        self.count_tokens = count_tokens

    @property
    def room(self) -> int:
        """Base tokens the answer may still add."""
        return self.options.max_tokens - self.guide_tokens - self.base_tokens

    def result(self) -> NudgingResult:
        error = None
        current: Round | None = None
        before = self.out, self.base_tokens  # at the start of the round under way
        try:
            while True:
                if len(self.rounds) >= self.options.max_rounds:
                    stop_reason = "rounds"
                    break
                before = self.out, self.base_tokens
                current, first, stop_reason = self._nudging_words()
                if current is None:  # the same words a fourth time: not appended
                    break
                if first is not None:
                    with closing(first[0]):
                        self._base_phase(current, *first)
                    self._count_words()
                self._finish_round(current)
                current = None
                if not stop_reason and self.room <= 0:
                    stop_reason = "length"
                if stop_reason:
                    break
        except ModelError as failure:
            stop_reason, error = "error", str(failure)
            if current is not None:  # its words are decided and its base text so far is final
                try:
                    self._count_words()
                except ModelError:  # its words cannot be counted: the answer ends before it
                    self.out, self.base_tokens = before
                    self.uncounted = current = None
            if current is not None:
                self._finish_round(current)
        return NudgingResult(
            method=self.options.name,
            text=strip_repeated_suffix(self.out),
            stop_reason=stop_reason,
            error=error,
            rounds=self.rounds,
            guide_tokens=self.guide_tokens,
            base_tokens=self.base_tokens,
            tokens=self.guide_tokens + self.base_tokens,
            generated=self.generated,
            token_counts=self.token_counts,
            model_calls=self.calls,
            seconds=time.perf_counter() - self.started,
            prompts={"base": self.base_prompt.text, "guide": self.guide_prompt.text},
            templates={"base": self.base_prompt.template, "guide": self.guide_prompt.template},
        )

    def _finish_round(self, current: Round) -> None:
        self.rounds.append(current)
        if self.on_text:
            self.on_text(current.nudging_words, "guide")
            self.on_text(current.base_text, "base")

    def _nudging_words(self) -> tuple[Round | None, tuple[BaseStream, Step] | None, str]:
        """Steps 1 and 2: the guide proposes, the base says where it is ready.

        Returns this round with its nudging words appended to the output (None when the same
        words would come a fourth round in a row: then nothing is appended), the open base
        stream and its first step when a base phase follows, and the stop reason the round
        already has ("" for none)."""
        length = self.proposal_length
        while True:
            proposal = self._propose(length)
            if proposal.finish_reason in ("end", "stop"):
                current, cut = self._append_words(proposal.text)
                return current, None, "length" if cut else "guide_stop"
            proposed = split_words(proposal.text)
            words, first, ready = self._accept_words(proposed)
            if ready or length == self.options.guide_chunk:
                break
            # A proposal cut short (adapt_proposals) that the base was ready nowhere in: the
            # whole one would offer more words, or a longer first word. Ask for it.
            length = self.options.guide_chunk
        if self.options.adapt_proposals:
            # What the base needed: its nudging words and the word it was ready at, or all.
            looked_at = len(split_words(words)) + 1 if ready else len(proposed)
            self._adapt_proposal_length(proposal, len(" ".join(proposed[:looked_at])))
        recent = [r.nudging_words for r in self.rounds[1 - REPEATED_NUDGE_ROUNDS:]]
        if len(recent) == REPEATED_NUDGE_ROUNDS - 1 and all(w == words for w in recent):
            if first is not None:
                first[0].close()
            return None, None, "repeated_nudging"
        if first is not None and self._surely_fits(words):
            self.out += words  # counted once the base's stream is closed
            self.uncounted = words
            return Round(words), first, ""
        if first is not None and self.count_tokens(words) >= self.room:
            # The words fill the budget: no base phase. The stream is closed before cutting
            # them (counting asks the server, which may be busy with the open stream).
            first[0].close()
            first = None
        current, cut = self._append_words(words)
        return current, first, "length" if cut else ""

    def _propose(self, max_tokens: int) -> Completion:
        """Step 1: the guide's proposal of up to ``max_tokens`` tokens."""
        self.calls["guide"] += 1
        stop = [self.guide_prompt.end_of_turn] if self.guide_prompt.end_of_turn else []
        proposal = self.guide.model.complete(
            [self.guide_prompt.text + self.out], max_tokens=max_tokens,
            sampling=_nth_call(self.guide.sampling, self.calls["guide"]), stop=stop, lookup=self.proposals)[0]
        self.generated["guide"] += len(proposal.steps)
        self.proposals = [proposal.text, *self.proposals[:LOOKUP_PROPOSALS - 1]]
        return proposal

    def _adapt_proposal_length(self, proposal: Completion, needed: int) -> None:
        """Ask next for the tokens that gave this proposal's first ``needed`` characters, plus
        :data:`PROPOSAL_SLACK`, up to ``guide_chunk``."""
        tokens = covered = 0
        for step in proposal.steps:
            if covered >= needed:
                break
            tokens += 1
            covered += len(step.token.text)
        self.proposal_length = min(self.options.guide_chunk, tokens + PROPOSAL_SLACK)

    def _surely_fits(self, words: str) -> bool:
        """Whether ``words`` leave room for a whole first base chunk, whatever their count.

        A token holds at least one byte of text, and a tokenizer may add one token in front
        (SentencePiece's dummy prefix), so ``words`` take at most their UTF-8 length plus one
        tokens. Then neither the budget nor the base's first chunk depends on their count,
        which is asked for after the base's stream is closed (a server may serve one request
        at a time): a text whose count is never needed is never counted."""
        return len(words.encode("utf-8")) + 1 + self.options.base_chunk <= self.room

    def _count_words(self) -> None:
        """Add the tokens of the nudging words that :meth:`_nudging_words` left uncounted."""
        if self.uncounted is not None:
            self.guide_tokens += self.count_tokens(self.uncounted)
            self.uncounted = None

    def _append_words(self, words: str) -> tuple[Round, bool]:
        """A round with these nudging words, appended to the output; cut to the longest
        prefix that fits the length budget where they do not fit (then True)."""
        cut = self.count_tokens(words) > self.room
        if cut:
            words = fit_tokens(words, self.room, self.count_tokens)
        self.out += words
        self.guide_tokens += self.count_tokens(words)
        return Round(words), cut

    def _accept_words(self, words: list[str]) -> tuple[str, tuple[BaseStream, Step] | None, bool]:
        """Step 2: the nudging words, the base's open stream with its first token when it is
        ready and has one, and whether it was ready.

        Words that might not leave room for the base's first chunk are counted before the
        stream opens: a server may serve one request at a time (llama.cpp cancels an open
        stream when another request arrives)."""
        accepted = [words[0]]
        for i in range(1, len(words)):
            if words[i]:  # an empty word (two spaces in a row) is not asked about
                text = " ".join(accepted)
                if not self._surely_fits(text):
                    self.count_tokens(text)
                stream = self._base_stream(self.out + text, self.options.base_chunk)
                step = next(stream, None)
                if step is None:  # the base's answer here is its end of text: ready, no base phase
                    return text, None, True
                # The token the base takes there (its greedy token when greedy) must start the word.
                if (" " + words[i]).startswith(step.token.text) or step.top1_prob >= self.options.gamma:
                    return text, (stream, step), True
                stream.close()
            if i < len(words) - 1:  # the last word may be cut mid-word: never accepted
                accepted.append(words[i])
        return " ".join(accepted), None, False

    def _base_stream(self, text: str, limit: int) -> BaseStream:
        self.calls["base"] += 1
        return self._read_counted(self.base.model.stream(
            self.base_prompt.text + text, max_tokens=limit, top_logprobs=1,
            sampling=_nth_call(self.base.sampling, self.calls["base"]), lookup=self.proposals))

    def _read_counted(self, steps: BaseStream) -> BaseStream:
        with closing(steps):
            for step in steps:
                self.generated["base"] += 1
                yield step

    def _base_phase(self, current: Round, stream: BaseStream, first: Step) -> None:
        """Step 3: the base continues, chunk by chunk, until a rule or the length budget
        ends its phase. Appends to ``current.base_text`` and the output as it goes."""
        gamma, base_chunk = self.options.gamma, self.options.base_chunk
        self._append_base(current, first.token.text, 1)  # kept whatever follows
        limit = base_chunk - 1  # the first chunk is the rest of step 2's response
        # With base_chunk 1 that chunk is empty, and rule (a) ends the phase at once.
        while self.room > 0 and limit > 0:
            limit = min(limit, self.room)
            with closing(stream):
                accepted, unsure, ended = _read_sure(stream, limit, gamma)
                text = "".join(s.token.text for s in accepted)
                whole = text
                if unsure is not None:
                    whole += unsure.token.text
                    # (a) compares the chunk's whole text with this round's base text. Past the
                    # unsure token it can change the answer only when the accepted text is in
                    # that text (else the whole is not), is not empty and is short enough for
                    # (c) not to drop it anyway: only then is the rest of the chunk read.
                    if text and text in current.base_text and not _long(text):
                        rest, ended = _read(stream, limit - len(accepted) - 1)
                        whole += "".join(s.token.text for s in rest)
            self._count_words()  # the stream is closed, and the next chunk needs the exact room
            if whole in current.base_text:  # (a); the empty chunk always is
                return
            if _long(text) and text in self.out:  # (c); the output ends with this round's base text
                return
            self._append_base(current, text, len(accepted))  # (d)
            if unsure is not None or ended:
                return
            limit = base_chunk
            if self.room > 0:
                stream = self._base_stream(self.out, min(limit, self.room))

    def _append_base(self, current: Round, text: str, tokens: int) -> None:
        current.base_text += text
        self.out += text
        self.base_tokens += tokens


def _long(text: str) -> bool:
    """Rule (c)'s size test: more than five pieces when split on single spaces."""
    return len(text.split(" ")) > REPEATED_CHUNK_MIN_PIECES


def _read_sure(stream: BaseStream, limit: int, gamma: float) -> tuple[list[Step], Step | None, bool]:
    """Up to ``limit`` steps, stopping at the first unsure one. Returns the sure steps, the
    unsure step (None if none) and whether the base ended its text."""
    sure: list[Step] = []
    while len(sure) < limit:
        step = next(stream, None)
        if step is None:
            return sure, None, True
        if step.top1_prob < gamma:
            return sure, step, False
        sure.append(step)
    return sure, None, False


def _read(stream: BaseStream, limit: int) -> tuple[list[Step], bool]:
    """Up to ``limit`` steps, and whether the base ended its text before that."""
    steps: list[Step] = []
    while len(steps) < limit:
        step = next(stream, None)
        if step is None:
            return steps, True
        steps.append(step)
    return steps, False


def _nth_call(sampling: Sampling, call: int) -> Sampling:
    """A seeded run stays repeatable, but each call draws fresh random numbers (reusing one
    seed for every call would give every call the same draws)."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=(sampling.seed + call) % SEED_LIMIT)
