"""One model alone: the base-only and guide-only baselines of the nudging paper."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from towline.methods.base import BASE, GUIDE, Method, OnText, Participant, Result, Role, register
from towline.prompts import PromptRequest


@dataclass(kw_only=True)
class _Alone(Method):
    """Decode with the model of the method's one role: greedy unless its sampling says otherwise."""

    def run(self, request: PromptRequest, models: Mapping[str, Participant], *,
            on_text: OnText | None = None) -> Result:
        (role,) = self.roles
        participant = models[role.name]
        started = time.perf_counter()
        prompt = participant.prompt(request, chat=role.chat, room=self.max_tokens, role=role.name)
        stop = [prompt.end_of_turn] if prompt.end_of_turn else []
        completion = participant.model.complete([prompt.text], max_tokens=self.max_tokens,
                                                sampling=participant.sampling, stop=stop)[0]
        if on_text:
            on_text(completion.text, role.name)
        return Result(
            method=self.name,
            text=completion.text,
            stop_reason="length" if completion.finish_reason == "length" else "end",
            tokens=len(completion.steps),
            model_calls={role.name: 1},
            seconds=time.perf_counter() - started,
            prompts={role.name: prompt.text},
            templates={role.name: prompt.template},
        )


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
