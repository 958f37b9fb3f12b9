"""towline's nudging against the plain, full-chunk transcription of its rules
(bench/spec_nudging.py), on the same models: every round's (nudging words, base text), the
stop reason, the text and the model calls must be equal, and towline must read no more base
tokens than the rules need.

The models are greedy and deterministic: llama.cpp servers that evaluate every prompt from
scratch (conftest), local weights with prefix reuse and drafting off (a reused KV cache, or a
pass over several tokens, gives logits that differ in the last bits, which can flip a near-tie
between two calls), tiny random models. tests/methods/test_nudging_speed.py holds the fast
local path to this plain one.

The GSM8K questions in tests/fixtures/gsm8k_sample.jsonl are the first 12 of the GSM8K test
split (openai/grade-school-math, MIT license).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Generator
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.spec_nudging import SpecRun, spec_nudging
from towline.methods.nudging import NudgingResult, nudge
from towline.models.base import Completion, Delegating, Model, Step
from towline.models.local import LocalModel
from towline.models.openai import OpenAIModel
from towline.prompts import PromptRequest, build_prompt

QUESTIONS = [json.loads(line)["question"] for line in
             (Path(__file__).parents[1] / "fixtures" / "gsm8k_sample.jsonl").read_text().splitlines()]
SYSTEM = "Answer the question by walking through the reasoning steps."


class Shared(Delegating):
    """A model as it is, used by two runs in turn: towline's, then the transcription's.

    It counts the steps its streams yield (what towline read). A stream that towline stops
    reading is then read to its end, and every request's whole answer is kept, so that the
    transcription's identical full-chunk requests are answered from them: each distinct
    request reaches the model once, which halves the time on a server that evaluates every
    prompt from scratch. (A llama.cpp server's stream gives the steps of its completion,
    tests/models/test_openai.py; local weights decode both in one loop.) Both runs are greedy,
    so a request is its prompt, its length and its stop strings.
    """

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.answers: dict[tuple, Completion] = {}
        self.steps_read = 0

    def complete(self, prompts, *, max_tokens, stop=(), **kwargs):
        (prompt,) = prompts
        key = (prompt, max_tokens, tuple(stop))
        if key not in self.answers:
            (self.answers[key],) = self.model.complete([prompt], max_tokens=max_tokens, stop=stop, **kwargs)
        return [self.answers[key]]

    def stream(self, prompt, *, max_tokens, **kwargs) -> Generator[Step, None, None]:
        steps: list[Step] = []
        with closing(self.model.stream(prompt, max_tokens=max_tokens, **kwargs)) as inner:
            try:
                for step in inner:
                    steps.append(step)
                    self.steps_read += 1
                    yield step
            except GeneratorExit:
                steps.extend(inner)
                raise
            finally:
                ended = len(steps) < max_tokens
                self.answers[(prompt, max_tokens, ())] = Completion(
                    "".join(s.token.text for s in steps), steps, "end" if ended else "length")


def both(base: Model, guide: Model, request: PromptRequest, **options) -> tuple[NudgingResult, SpecRun, int]:
    """towline's answer, the transcription's, and the base tokens towline read."""
    base, guide = Shared(base), Shared(guide)
    result = nudge(base=base, guide=guide, request=request, **options)
    template = options.pop("guide_template", None)
    end_of_turn = build_prompt(request, chat=True, template=template, model_template=guide.chat_template).end_of_turn
    spec = spec_nudging(base, guide, result.prompts["base"], result.prompts["guide"],
                        guide_stop=[end_of_turn] if end_of_turn else [], **options)
    return result, spec, base.steps_read


def assert_same(result: NudgingResult, spec: SpecRun, read: int) -> None:
    assert [(r.nudging_words, r.base_text) for r in result.rounds] == spec.rounds
    assert (result.stop_reason, result.text) == (spec.stop_reason, spec.text)
    assert (result.guide_tokens, result.base_tokens) == (spec.guide_tokens, spec.base_tokens)
    assert result.model_calls == spec.requests
    assert read == spec.base_tokens_needed == result.generated["base"]
    assert result.generated["guide"] == spec.generated["guide"]


def gsm8k(question: str) -> PromptRequest:
    return PromptRequest(question=question, system=SYSTEM, question_prefix="Question: ")


# -- tiny random models: many settings, every rule's edge ---------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_base, tiny_guide) -> tuple[LocalModel, LocalModel]:
    return (LocalModel(tiny_base.model, tiny_base.tokenizer, name="tiny-base", reuse_prefix=False, draft=False),
            LocalModel(tiny_guide.model, tiny_guide.tokenizer, name="tiny-guide", reuse_prefix=False, draft=False))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gamma=st.sampled_from([0.0, 0.1, 0.3, 0.4, 0.6, 1.0]), guide_chunk=st.integers(1, 10),
       base_chunk=st.integers(1, 8), max_tokens=st.integers(1, 40))
def test_tiny_models_follow_the_rules(tiny_pair, gamma, guide_chunk, base_chunk, max_tokens):
    base, guide = tiny_pair
    result, spec, read = both(base, guide, PromptRequest(question="What is 2+2?"), gamma=gamma,
                              guide_chunk=guide_chunk, base_chunk=base_chunk, max_tokens=max_tokens,
                              guide_template="chatml")
    assert_same(result, spec, read)
    assert result.tokens <= max_tokens


# -- real models: llama.cpp servers and local weights -------------------------------------


@pytest.mark.real_models
def test_servers_follow_the_rules_on_gsm8k(smol_url):
    """SmolLM2-135M-Instruct on a plain prompt as the base, nudged by itself on its chat
    prompt, over a llama.cpp server. (A Gemma base costs ~8x more here: llama-cpp-python
    sorts the whole 262k vocabulary in Python at every token to report log-probs.)"""
    served = OpenAIModel("smollm2-135m-instruct", base_urls=[smol_url], max_retries=0)
    seen = Counter()
    for question in QUESTIONS[:10]:
        result, spec, read = both(served, served, gsm8k(question), max_tokens=48, guide_template="chatml")
        assert_same(result, spec, read)
        seen.update(spec.phase_ends)
        seen.update(rounds=len(result.rounds), read=read, generated=spec.generated["base"])
    print(dict(seen))
    # The answers exercise the rules, and the fast path reads far fewer base tokens than
    # full chunks bring.
    assert seen["rounds"] >= 50 and seen["unsure"] >= 10
    assert seen["read"] < seen["generated"] / 2


@pytest.mark.real_models
def test_local_weights_follow_the_rules_on_gsm8k(gemma_base, smollm2_guide):
    """gemma-3-270m nudged by SmolLM2-135M-Instruct on local weights (the bundled pair)."""
    base = LocalModel(gemma_base.model, gemma_base.tokenizer, name=gemma_base.name, reuse_prefix=False, draft=False)
    guide = LocalModel(smollm2_guide.model, smollm2_guide.tokenizer, name=smollm2_guide.name,
                       reuse_prefix=False, draft=False)
    for question in QUESTIONS[:2]:
        result, spec, read = both(base, guide, gsm8k(question), max_tokens=48)
        assert_same(result, spec, read)
        assert any(r.base_text for r in result.rounds)
