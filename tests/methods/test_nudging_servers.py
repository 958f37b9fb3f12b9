"""Nudging over OpenAI-compatible servers (real llama.cpp servers on 127.0.0.1), and the
same run on local weights of the same GGUF files.

llama.cpp computes with the quantized weights and its own kernels; the local backend
de-quantizes them to fp32 and runs transformers. Greedy texts therefore agree until the
first near-tie that the two sets of numerics break differently: the tests pin agreement on
the opening of the answer, not on every token.
"""

from __future__ import annotations

import pytest

from towline.methods.nudging import nudge
from towline.methods.base import Participant
from towline.methods.single import BaseOnly
from towline.models.openai import OpenAIModel
from towline.prompts import FAMILIES, PromptRequest

pytestmark = pytest.mark.real_models

REQUEST = PromptRequest(
    question=("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
              "in May. How many clips did Natalia sell altogether in April and May?"),
    system="Answer the question by walking through the reasoning steps.",
    question_prefix="Question: ",
)


@pytest.fixture(scope="module")
def served_base(gemma_url) -> OpenAIModel:
    return OpenAIModel("gemma-3-270m", base_urls=[gemma_url])


@pytest.fixture(scope="module")
def served_guide(smol_url, smollm2_guide) -> OpenAIModel:
    # The same template the local SmolLM2 uses, so both backends see identical prompts.
    return OpenAIModel("smollm2-135m-instruct", base_urls=[smol_url], chat_template=smollm2_guide.chat_template)


def test_nudging_with_both_models_behind_servers(served_base, served_guide):
    result = nudge(base=served_base, guide=served_guide, request=REQUEST, max_tokens=64)
    assert result.text.strip()
    assert 0 < result.guide_token_fraction < 1
    assert result.stop_reason in {"guide_stop", "length", "rounds", "repeated_nudging"}
    assert result.model_calls["base"] > 0 and result.model_calls["guide"] > 0


NEAR_TIE_NATS = 0.5
"""Two tokens are a near-tie when their log-probs differ by less than this under a backend.
llama.cpp's Q4 kernels and the fp32 de-quantized weights move a token's log-prob by up to a
few tenths of a nat; a gap that small can be ordered either way on another CPU."""


def _logprob(step, text: str) -> float:
    return next((t.logprob for t in step.top if t.text == text), -float("inf"))


def test_local_and_server_agree_on_greedy_text_up_to_a_near_tie(served_base, gemma_base):
    prompt = BaseOnly(max_tokens=12).run(REQUEST, {"base": Participant(gemma_base)}).prompts["base"]
    served = served_base.complete([prompt], max_tokens=24, top_logprobs=5)[0].steps
    local = gemma_base.complete([prompt], max_tokens=24, top_logprobs=5)[0].steps
    served_texts = [s.token.text for s in served]
    local_texts = [s.token.text for s in local]
    parted = next((i for i, (a, b) in enumerate(zip(served_texts, local_texts)) if a != b), None)
    if parted is None:
        assert served_texts[:len(local_texts)] == local_texts[:len(served_texts)]
        return
    assert parted >= 1, "the two backends disagree on the very first token"
    # Where they part, the two choices must be a near-tie under both backends.
    for steps in (served, local):
        gap = abs(_logprob(steps[parted], served_texts[parted]) - _logprob(steps[parted], local_texts[parted]))
        assert gap < NEAR_TIE_NATS, (parted, served_texts[:parted + 1], local_texts[:parted + 1], gap)


def test_cross_family_nudging_over_http_with_a_named_template(served_base, smol_url):
    guide = OpenAIModel("smollm2-135m-instruct", base_urls=[smol_url])
    result = nudge(base=served_base, guide=guide, request="What is 12 + 30?", guide_template="chatml",
                   max_tokens=24)
    assert result.prompts["guide"].startswith("<|im_start|>user\nWhat is 12 + 30?")
    assert result.templates["guide"] == "family:chatml"
    assert result.text.strip()
