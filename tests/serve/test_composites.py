"""Aligned composites over HTTP, and towline's own openai backend nudging through models a
towline server serves."""

from __future__ import annotations

import json

import httpx
import pytest

from towline.methods.nudging import nudge
from towline.models.openai import OpenAIModel
from towline.prompts import PromptRequest, Turn

QUESTION = "What is 12 + 30?"
SYSTEM = "Answer the question by walking through the reasoning steps."


def test_composite_chat_is_the_local_method_with_its_result_alongside(client, aligned):
    local = aligned.generate(PromptRequest(question=QUESTION, system=SYSTEM))
    response = client.chat.completions.create(model="aligned", messages=[{"role": "system", "content": SYSTEM},
                                                                         {"role": "user", "content": QUESTION}])
    (choice,) = response.choices
    assert choice.message.content == local.text
    assert choice.finish_reason == ("length" if local.stop_reason == "length" else "stop")
    extra = choice.model_extra["towline"]
    assert extra["guide_token_fraction"] == local.guide_token_fraction
    assert extra["stop_reason"] == local.stop_reason and extra["nudging_words"] == local.nudging_words
    assert 0 < extra["guide_token_fraction"] < 1
    assert response.usage.completion_tokens == local.tokens
    assert response.usage.prompt_tokens == aligned.participants["base"].model.count_tokens(local.prompts["base"])


def test_composite_streams_each_round_as_it_is_written(client, aligned):
    local = aligned.generate(PromptRequest(question=QUESTION))
    chunks = [c.choices[0] for c in client.chat.completions.create(
        model="aligned", messages=[{"role": "user", "content": QUESTION}], stream=True)]
    pieces = [(c.model_extra["towline"]["role"], c.delta.content) for c in chunks if c.delta.content]
    expected = [(role, text) for r in local.rounds for role, text in (("guide", r.nudging_words), ("base", r.base_text))
                if text]
    assert pieces == expected
    assert chunks[0].delta.role == "assistant"
    final = chunks[-1].model_extra["towline"]
    assert (final["text"], final["guide_token_fraction"]) == (local.text, local.guide_token_fraction)


def test_composite_completion_takes_the_prompt_as_the_question(client, aligned):
    local = aligned.generate(PromptRequest(question=QUESTION))
    response = client.completions.create(model="aligned", prompt=[QUESTION, QUESTION], max_tokens=24)
    assert [c.text for c in response.choices] == [local.text, local.text]
    streamed = client.completions.create(model="aligned", prompt=QUESTION, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "".join(r.nudging_words + r.base_text for r in local.rounds)


def test_composite_chat_with_history_and_request_sampling(client, aligned):
    history = (Turn("user", "What is 1 + 1?"), Turn("assistant", "2"))
    local = aligned.generate(PromptRequest(question=QUESTION, history=history))
    messages = [{"role": t.role, "content": t.content} for t in history] + [{"role": "user", "content": QUESTION}]
    assert client.chat.completions.create(model="aligned", messages=messages).choices[0].message.content == local.text
    # A request's sampling applies to every model of the composite, and a seed makes it repeat.
    sampled = [client.chat.completions.create(model="aligned", messages=messages, temperature=1.0, seed=3, max_tokens=12)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "Hi", "logprobs": 1}, "reports no log-probs"),
    ({"prompt": "Hi", "echo": True}, "reports no log-probs and no echo"),
    ({"prompt": "Hi", "stop": ["."]}, "stop strings are not supported"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens: must be at least 1, got 0"),
    ({"prompt": "word " * 2100, "max_tokens": 8}, "has a context of 2048 tokens"),
    ({"prompt": "Hi", "max_tokens": 4000}, "max_tokens 4000 does not fit the base model"),
    ({"prompt": "Hi", "temperature": -0.5}, "temperature: must be at least 0"),
])
def test_bad_composite_requests_get_400(url, body, message):
    response = httpx.post(f"{url}/v1/completions", content=json.dumps({"model": "aligned", **body}), timeout=120)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_towline_openai_backend_nudges_through_served_models(url, base, guide):
    """Nudging with both models behind this server gives the local answer exactly.

    Exact equality is legitimate here, unlike against llama.cpp: the server runs the very
    weights of the local models with the same fp32 code, and both sides compute every prompt
    from scratch (no prefix-cache reuse), so each model call sees the same inputs and returns
    the same numbers; log-probs travel as JSON floats, which round-trip exactly.
    """
    served_base = OpenAIModel("tiny-base", base_urls=[f"{url}/v1"], max_retries=0)
    served_guide = OpenAIModel("tiny-guide", base_urls=[f"{url}/v1"], max_retries=0,
                               chat_template=guide.chat_template)
    request = PromptRequest(question=QUESTION, system=SYSTEM)
    with served_base, served_guide:
        over_http = nudge(base=served_base, guide=served_guide, request=request, max_tokens=40)
    local = nudge(base=base, guide=guide, request=request, max_tokens=40)
    assert over_http.prompts == local.prompts
    assert over_http.rounds == local.rounds and over_http.text == local.text
    assert over_http.guide_token_fraction == local.guide_token_fraction
    assert len(local.rounds) > 1  # the guide did step in, so both models' answers were compared


def test_towline_openai_backend_scores_and_counts_through_the_server(url, guide):
    # Scoring first checks the server's echo against the probe text the model generates; the
    # tiny guide continues that probe with whole characters (the tiny base starts with a
    # stray byte, whose text cannot be re-tokenized into the same tokens).
    with OpenAIModel("tiny-guide", base_urls=[f"{url}/v1"], max_retries=0) as served:
        assert served.count_tokens("The capital of France is") == guide.count_tokens("The capital of France is")
        (over_http,) = served.score(["The capital of France is\n"], [" Paris, of course."], top_logprobs=2)
        (local,) = guide.score(["The capital of France is\n"], [" Paris, of course."], top_logprobs=2)
        assert [(s.token.text, s.token.logprob) for s in over_http.steps] == \
            [(s.token.text, s.token.logprob) for s in local.steps]
        (distribution,) = served.open(["The capital of France is"]).next(top_logprobs=3)
        (expected,) = guide.open(["The capital of France is"]).next(top_logprobs=3)
        assert [(t.text, t.logprob) for t in distribution.top] == [(t.text, t.logprob) for t in expected.top]
