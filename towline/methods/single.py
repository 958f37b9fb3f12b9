"""One model alone: the base-only and guide-only baselines of the nudging paper."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from towline.models.base import GREEDY, Model, Sampling
from towline.prompts import PromptRequest, build_prompt


@dataclass
class SingleResult:
    text: str
    stop_reason: str
    """``end`` (the model ended its answer), ``length`` (max_tokens)."""
    tokens: int
    model_calls: dict[str, int]
    seconds: float
    prompts: dict[str, str]
    templates: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def generate_alone(*, model: Model, role: str, request: PromptRequest | str, max_tokens: int = 256,
                   sampling: Sampling = GREEDY, template: str | None = None) -> SingleResult:
    """Answer with one model: ``role="base"`` gets the plain prompt, ``role="guide"`` its
    chat prompt (SPEC §1)."""
    if role not in ("base", "guide"):
        raise ValueError(f"role must be 'base' or 'guide', got {role!r}")
    if isinstance(request, str):
        request = PromptRequest(question=request)
    started = time.perf_counter()
    prompt = build_prompt(request, chat=role == "guide", template=template,
                          model_template=model.chat_template)
    stop = [prompt.end_of_turn] if prompt.end_of_turn else []
    completion = model.complete([prompt.text], max_tokens=max_tokens, sampling=sampling, stop=stop)[0]
    return SingleResult(
        text=completion.text,
        stop_reason="length" if completion.finish_reason == "length" else "end",
        tokens=len(completion.steps),
        model_calls={role: 1},
        seconds=time.perf_counter() - started,
        prompts={role: prompt.text},
        templates={role: prompt.template},
    )
