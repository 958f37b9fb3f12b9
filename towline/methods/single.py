"""One model alone: the base-only and guide-only baselines of the nudging paper.

The answer is read through :meth:`Model.stream`, so that it shows as it is written and a
model failing mid-answer (a server that dies) still leaves the text so far: the result then
has ``stop_reason="error"`` and the error (a failure before the first token is raised, as
there is nothing to keep). Greedy text is what :meth:`Model.complete` gives, and never more
than ``max_tokens`` tokens are read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import ClassVar

from towline.methods.base import BASE, GUIDE, Method, OnText, Participant, Result, Role, register
from towline.models.base import ModelError
from towline.prompts import BuiltPrompt, PromptRequest


@dataclass(kw_only=True)
class _Alone(Method):
    """Decode with the model of the method's one role: greedy unless its sampling says otherwise."""

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> Result:
        (role,) = self.roles
        participant = models[role.name]
        started = time.perf_counter()
        prompt = participant.prompt(request, chat=role.chat, room=self.max_tokens, role=role.name)
        answer = _Answer(prompt.end_of_turn, role.name, on_text)
        error = None
        stream = participant.model.stream(prompt.text, max_tokens=self.max_tokens,
                                          sampling=participant.sampling)
        try:
            with closing(stream):  # closing it stops the decoding, e.g. at the end-of-turn string
                for step in stream:
                    if answer.add(step.token.text) or answer.read == self.max_tokens:
                        break
        except ModelError as failure:
            if answer.read == 0:  # nothing to keep: the request itself failed (a prompt too long, ...)
                raise
            error = str(failure)
        answer.flush()
        return self._result(role, prompt, answer, time.perf_counter() - started, error)

    def run_batch(self, requests: Sequence[PromptRequest], models: Mapping[str, Participant]) -> list[Result]:
        """Greedy answers decoded together in one :meth:`Model.complete` call. Sampled
        answers are drawn one request at a time, so that a request's answer does not depend
        on the others in its batch."""
        (role,) = self.roles
        participant = models[role.name]
        if len(requests) < 2 or not participant.sampling.greedy:
            return super().run_batch(requests, models)
        started = time.perf_counter()
        prompts = [participant.prompt(r, chat=role.chat, room=self.max_tokens, role=role.name) for r in requests]
        end_of_turn = prompts[0].end_of_turn  # one model, one template: the same for every request
        completions = participant.model.complete([p.text for p in prompts], max_tokens=self.max_tokens,
                                                 sampling=participant.sampling,
                                                 stop=[end_of_turn] if end_of_turn else [])
        seconds = (time.perf_counter() - started) / len(requests)  # each answer's share of the batch
        results = []
        for prompt, completion in zip(prompts, completions, strict=True):
            answer = _Answer(end_of_turn, role.name, None)
            for step in completion.steps:
                if answer.add(step.token.text):
                    break
            results.append(self._result(role, prompt, answer, seconds, None))
        return results

    def _result(self, role: Role, prompt: BuiltPrompt, answer: _Answer, seconds: float,
                error: str | None) -> Result:
        if error is not None:
            stop_reason = "error"
        else:
            stop_reason = "length" if answer.read == self.max_tokens and not answer.stopped else "end"
        return Result(
            method=self.name,
            text=answer.text,
            stop_reason=stop_reason,
            tokens=answer.tokens,
            model_calls={role.name: 1},
            seconds=seconds,
            prompts={role.name: prompt.text},
            templates={role.name: prompt.template},
            error=error,
        )


class _Answer:
    """The text of a streamed answer, cut at the template's end-of-turn string.

    Text goes to ``on_text`` once it is final: a tail that may be the start of the
    end-of-turn string waits until the next pieces tell.

    >>> shown = []
    >>> answer = _Answer("<|im_end|>", "guide", lambda piece, role: shown.append(piece))
    >>> [answer.add(piece) for piece in ["4", ".<|im", "_end|>"]]
    [False, False, True]
    >>> answer.text, answer.tokens, shown
    ('4.', 2, ['4', '.'])
    """

    def __init__(self, end_of_turn: str | None, role: str, on_text: OnText | None) -> None:
        self.end_of_turn = end_of_turn
        self.role = role
        self.on_text = on_text
        self.text = ""
        self.stopped = False
        self._starts: list[int] = []  # where each token's text starts
        self._shown = 0

    @property
    def read(self) -> int:
        """Tokens taken so far."""
        return len(self._starts)

    @property
    def tokens(self) -> int:
        """Tokens whose text is (partly) kept: those of the end-of-turn string do not count,
        as a server counts a completion cut at a stop string."""
        return sum(1 for start in self._starts if start < len(self.text)) if self.stopped else len(self._starts)

    def add(self, piece: str) -> bool:
        """Take the next token's text; True once the end-of-turn string has appeared."""
        start = len(self.text)
        self._starts.append(start)
        self.text += piece
        end = self.end_of_turn
        cut = self.text.find(end, max(start - len(end) + 1, 0)) if end else -1
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
        self._show(len(self.text) if self.stopped else self._final_length())
        return self.stopped

    def flush(self) -> None:
        """Show what is still held back: the answer has ended."""
        self._show(len(self.text))

    def _final_length(self) -> int:
        """How much of the text cannot become part of the end-of-turn string any more."""
        end = self.end_of_turn
        if not end:
            return len(self.text)
        for overlap in range(min(len(end) - 1, len(self.text)), 0, -1):
            if self.text.endswith(end[:overlap]):
                return len(self.text) - overlap
        return len(self.text)

    def _show(self, upto: int) -> None:
        if self.on_text and upto > self._shown:
            self.on_text(self.text[self._shown:upto], self.role)
        self._shown = max(self._shown, upto)


@register
@dataclass(kw_only=True)
class BaseOnly(_Alone):
    name: ClassVar[str] = "base-only"
    summary: ClassVar[str] = "The base model alone, on its plain prompt (a baseline)."
    roles: ClassVar[tuple[Role, ...]] = (BASE,)


@register
@dataclass(kw_only=True)
class GuideOnly(_Alone):
    name: ClassVar[str] = "guide-only"
    summary: ClassVar[str] = "The guide (chat) model alone, on its chat prompt (a baseline)."
    roles: ClassVar[tuple[Role, ...]] = (GUIDE,)
