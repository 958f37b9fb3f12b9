"""The Python API behind ``towline generate``.

>>> import towline
>>> result = towline.generate(method="nudging", base="gemma-3-270m",      # doctest: +SKIP
...                           guide="smollm2-135m-instruct", prompt="What is 12 + 30?")
>>> result.text, result.guide_token_fraction                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from towline.methods.nudging import NudgingResult, Round, nudge
from towline.methods.single import SingleResult, generate_alone
from towline.models import load_model
from towline.models.base import Model, Sampling
from towline.prompts import PromptRequest

METHODS = ("nudging", "base-only", "guide-only")
DEFAULT_BASE = "gemma-3-270m"
DEFAULT_GUIDE = "smollm2-135m-instruct"

Method = Literal["nudging", "base-only", "guide-only"]


def generate(
    *,
    method: Method = "nudging",
    base: str | Model = DEFAULT_BASE,
    guide: str | Model = DEFAULT_GUIDE,
    prompt: str | PromptRequest,
    max_tokens: int = 256,
    base_sampling: Sampling = Sampling(),
    guide_sampling: Sampling = Sampling(),
    base_template: str | None = None,
    guide_template: str | None = None,
    gamma: float = 0.4,
    guide_chunk: int = 16,
    base_chunk: int = 16,
    max_rounds: int = 150,
    on_round: Callable[[Round], None] | None = None,
) -> NudgingResult | SingleResult:
    """Answer ``prompt`` with one method. Models are spec strings (a registry name, a path,
    a Hugging Face id or ``openai:MODEL@URL``) or already-open :class:`Model` objects.

    ``prompt`` is the question (a string) or a full :class:`PromptRequest`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    open_model = (lambda m: load_model(m) if isinstance(m, str) else m)
    if method == "base-only":
        return generate_alone(model=open_model(base), role="base", request=prompt, max_tokens=max_tokens,
                              sampling=base_sampling, template=base_template)
    if method == "guide-only":
        return generate_alone(model=open_model(guide), role="guide", request=prompt, max_tokens=max_tokens,
                              sampling=guide_sampling, template=guide_template)
    return nudge(
        base=open_model(base), guide=open_model(guide), request=prompt, gamma=gamma,
        guide_chunk=guide_chunk, base_chunk=base_chunk, max_tokens=max_tokens, max_rounds=max_rounds,
        base_sampling=base_sampling, guide_sampling=guide_sampling, base_template=base_template,
        guide_template=guide_template, on_round=on_round,
    )
