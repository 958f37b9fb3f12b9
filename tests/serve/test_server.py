"""towline serve over real HTTP on 127.0.0.1, driven by the official openai client: local
models served as themselves (vLLM's shapes), tokenization, errors, auth, limits, concurrency
and disconnects."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from towline.models.base import GREEDY, Sampling
from towline.models.openai import OpenAIModel
from towline.prompts import PromptRequest, Turn, build_prompt
from towline.serve.app import create_app

PROMPT = "The capital of France is"


def post(url: str, path: str, body: bytes | dict, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=120, **kwargs)


# -- models, completions, logprobs ---------------------------------------------------------

def test_models_lists_each_model_and_the_composite(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-base", "tiny-guide", "tiny-cached", "aligned"}
    assert cards["tiny-base"].model_extra["max_model_len"] == 2048
    assert cards["aligned"].model_extra["towline"]["method"] == "nudging"
    assert cards["aligned"].model_extra["towline"]["models"] == {"base": "tiny-base", "guide": "tiny-guide"}


def test_greedy_completion_is_the_local_completion_with_vllm_logprobs(client, base):
    response = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    (local,) = base.complete([PROMPT], max_tokens=6, top_logprobs=3)
    (choice,) = response.choices
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (local.text, "length", None)
    assert response.usage.prompt_tokens == len(base.encode(PROMPT))
    assert response.usage.completion_tokens == 6
    logprobs = choice.logprobs
    assert logprobs.tokens == [s.token.text for s in local.steps]
    assert logprobs.token_logprobs == [s.token.logprob for s in local.steps]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for top, step in zip(logprobs.top_logprobs, local.steps):
        # vLLM's dict: the taken token, then the k best (one entry fewer when they coincide)
        assert top == {step.token.text: step.token.logprob, **{t.text: t.logprob for t in step.top}}


def test_echo_scores_the_prompt_with_none_for_its_first_token(client, base):
    response = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=2,
                                         echo=True)
    (choice,) = response.choices
    ids = base.encode(PROMPT)
    (scored,) = base.score([""], [PROMPT], top_logprobs=2)
    (generated,) = base.complete([PROMPT], max_tokens=2)
    assert choice.text == PROMPT + generated.text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 2
    # What towline's openai backend relies on to score: the entries are the prompt's tokens, then the
    # completion's, so the prompt has len(tokens) - completion_tokens entries.
    assert len(logprobs.tokens) - response.usage.completion_tokens == response.usage.prompt_tokens == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.tokens[0] == base.tokenizer.decode(ids[:1])
    assert logprobs.token_logprobs[1:len(ids)] == [s.token.logprob for s in scored.steps]
    assert logprobs.tokens[len(ids):] == [s.token.text for s in generated.steps]

    only_prompt = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    assert only_prompt.choices[0].text == PROMPT
    assert only_prompt.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:len(ids)]
    assert only_prompt.usage.completion_tokens == 0


@pytest.mark.parametrize("echo", [False, True])
def test_stream_gives_the_same_text_and_logprobs_as_one_response(client, echo):
    kwargs = dict(model="tiny-base", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=echo)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    choices = [c.choices[0] for c in chunks[:-1]]
    assert "".join(c.text for c in choices) == whole.text
    assert whole.text.startswith(PROMPT) == echo
    assert [c.finish_reason for c in choices] == [None] * (len(choices) - 1) + ["length"]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in choices if c.logprobs for x in getattr(c.logprobs, field)]
        assert streamed == getattr(whole.logprobs, field)


def test_stop_string_cuts_the_text_and_is_reported(client, base):
    (free,) = base.complete([PROMPT], max_tokens=8)
    stop = free.steps[3].token.text.strip() or free.steps[3].token.text
    (local,) = base.complete([PROMPT], max_tokens=8, stop=[stop])
    for stream in (False, True):
        response = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=8, temperature=0,
                                             stop=[stop, "never-in-this-text"], stream=stream)
        choices = [c.choices[0] for c in response] if stream else response.choices
        assert "".join(c.text for c in choices) == local.text
        assert stop not in local.text
        assert (choices[-1].finish_reason, choices[-1].model_extra["stop_reason"]) == ("stop", stop)


def test_seeded_sampling_repeats_and_n_choices_differ(client, base):
    kwargs = dict(model="tiny-base", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    three = client.completions.create(**kwargs, n=3)
    again = client.completions.create(**kwargs, n=3)
    one = client.completions.create(**kwargs)
    assert [c.text for c in three.choices] == [c.text for c in again.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == one.choices[0].text
    assert base.complete([PROMPT], max_tokens=8, sampling=Sampling(temperature=1.0, seed=7))[0].text == one.choices[0].text
    assert len({c.text for c in three.choices}) > 1


def test_several_prompts_get_their_own_choices(client, base):
    prompts = [PROMPT, "Once upon a time"]
    response = client.completions.create(model="tiny-base", prompt=prompts, max_tokens=4, temperature=0, n=2)
    texts = [c.text for c in response.choices]
    expected = [c.text for c in base.complete(prompts, max_tokens=4)]
    assert texts == [expected[0], expected[0], expected[1], expected[1]]
    assert response.usage.prompt_tokens == sum(len(base.encode(p)) for p in prompts)


# -- chat -------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def test_chat_renders_every_turn_through_the_model_template(url, client, guide):
    request = PromptRequest(question="And 3+3?", system="Be brief.",
                            history=(Turn("user", "What is 2+2?"), Turn("assistant", "4")))
    built = build_prompt(request, chat=True, model_template=guide.chat_template)
    assert built.text.count("<|im_start|>user") == 2 and "<|im_start|>assistant\n4<|im_end|>" in built.text
    (local,) = guide.complete([built.text], max_tokens=6, top_logprobs=2, stop=[built.end_of_turn])
    response = client.chat.completions.create(model="tiny-guide", messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2)
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == local.text
    assert response.usage.prompt_tokens == len(guide.encode(built.text))
    content = choice.logprobs.content
    assert [c.token for c in content] == [s.token.text for s in local.steps]
    assert [c.logprob for c in content] == [s.token.logprob for s in local.steps]
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    tokenized = post(url, "/tokenize", {"model": "tiny-guide", "messages": CHAT}).json()
    assert tokenized["count"] == len(guide.tokenizer(built.text, add_special_tokens=False).input_ids)


def test_chat_stream_opens_with_the_role_and_matches_one_response(client):
    kwargs = dict(model="tiny-guide", messages=CHAT, max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True)]
    assert chunks[0].delta.role == "assistant"
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].finish_reason == whole.finish_reason


def test_min_tokens_keeps_the_end_of_text_out_for_towline_decode_states(serve, guide, eos_biased, no_prefix_cache):
    # A model whose end-of-text logit is raised by 50 ends every text at once.
    ending = no_prefix_cache(eos_biased(guide, 50.0), "ending")
    url = serve({"ending": ending})
    with openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        assert client.completions.create(model="ending", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text == ""
        forced = client.completions.create(model="ending", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                           extra_body={"min_tokens": 2})
    (distribution,) = ending.open([PROMPT]).next(top_logprobs=3)
    (choice,) = forced.choices
    assert len(choice.logprobs.tokens) == 2 and choice.finish_reason == "stop"
    assert choice.logprobs.tokens[0] == distribution.top[1].text  # the best token that is not the end
    assert "" in choice.logprobs.top_logprobs[0]  # the end-of-text token is still reported


# -- tokenize ---------------------------------------------------------------------------------

def test_tokenize_and_detokenize_use_the_model_tokenizer(url, base):
    ids = base.tokenizer(PROMPT, add_special_tokens=False).input_ids
    out = post(url, "/tokenize", {"model": "tiny-base", "prompt": PROMPT, "add_special_tokens": False,
                                  "return_token_strs": True}).json()
    assert out == {"count": len(ids), "max_model_len": 2048, "tokens": ids,
                   "token_strs": base.tokenizer.convert_ids_to_tokens(ids)}
    assert post(url, "/detokenize", {"model": "tiny-base", "tokens": ids}).json() == {"prompt": PROMPT}


# -- bad input ----------------------------------------------------------------------------------

LONG = "word " * 2100  # more tokens than the tiny models' 2048-token context

BAD_REQUESTS = [  # (path, body, status, what the message must say)
    ("/v1/completions", b'{"model": "tiny-base", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", b'["tiny-base"]', 400, "must be a JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "the model `gpt-4` does not exist"),
    ("/v1/completions", {"prompt": "Hi"}, 400, "model: is required"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": "ten"}, 400,
     'max_tokens: must be an integer, got "ten"'),
    ("/v1/completions", {"model": "tiny-base", "prompt": 42}, 400, "prompt: must be a string"),
    ("/v1/completions", {"model": "tiny-base", "prompt": [1, 2]}, 400, "token ids are not taken"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "temperature": "hot"}, 400, "temperature: must be a number"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "stream": "yes"}, 400, "stream: must be true or false"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": -1}, 400, "max_tokens: must be at least 0"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": 5000}, 400,
     "maximum context length is 2048 tokens. However, you requested 5001 tokens"),
    ("/v1/completions", {"model": "tiny-base", "prompt": LONG, "max_tokens": 1}, 400,
     "in the prompt, 1 in the completion)"),
    ("/v1/completions", {"model": "tiny-base", "prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "logprobs": 21}, 400, "logprobs: must be at most 20"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "top_p": 0}, 400, "top_p: must be greater than 0"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "seed": -1}, 400, "seed: must be at least 0"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "stop": [""]}, 400, "stop strings must not be empty"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "n": 17}, 400, "n: must be at most 16"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "presence_penalty": 0.5}, 400,
     "presence_penalty=0.5 is not supported"),
    ("/v1/completions", {"model": "tiny-base", "prompt": "Hi", "min_tokens": 2, "temperature": 1}, 400,
     "min_tokens is supported for greedy decoding only"),
    ("/v1/completions", b'{"model": "tiny-base", "prompt": "Hi", "temperature": NaN}', 400, "NaN is not a JSON number"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": []}, 400, "messages: must hold at least one message"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": "Hi"}, 400, "messages: must be a non-empty list"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "robot", "content": "Hi"}]}, 400,
     "messages.0.role: must be one of"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "user"}]}, 400,
     "messages.0.content: is required"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "assistant", "content": "Hi"}]}, 400,
     "the last message must be the user's"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "user", "content": "a"},
                                                                 {"role": "system", "content": "b"}]}, 400,
     "system messages must come before"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "user", "content": LONG}],
                              "max_tokens": 1}, 400, "in the messages, 1 in the completion"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "user", "content": LONG}]}, 400,
     "which fills the 2048-token context"),
    ("/v1/chat/completions", {"model": "tiny-guide", "messages": [{"role": "user", "content": "Hi"}],
                              "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
    ("/tokenize", {"model": "tiny-base"}, 400, "give either prompt"),
    ("/tokenize", {"model": "aligned", "prompt": "Hi"}, 400, "has no single tokenizer"),
    ("/detokenize", {"model": "tiny-base", "tokens": [-1]}, 400, "are not token ids of tiny-base"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS,
                         ids=[f"{i}-{case[3][:30]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_a_4xx_saying_what_is_wrong(url, path, body, status, message):
    response = post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == status and error["type"].endswith("Error")


def test_the_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny-guide", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=10**6)


def test_unknown_routes_and_methods_get_openai_style_errors(url):
    missing = httpx.get(url + "/v1/engines")
    assert missing.status_code == 404 and "/v1/chat/completions" in missing.json()["error"]["message"]
    wrong = httpx.get(url + "/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"] == "GET is not allowed on /v1/completions"


def test_body_size_limit_with_and_without_a_length_header(serve, base):
    url = serve({"tiny-base": base}, max_body_bytes=2048)
    body = json.dumps({"model": "tiny-base", "prompt": "x" * 4000}).encode()
    assert post(url, "/v1/completions", body).status_code == 413
    chunked = httpx.post(url + "/v1/completions", content=iter([body[:1500], body[1500:]]), timeout=60)
    assert chunked.status_code == 413 and "larger than 2048 bytes" in chunked.json()["error"]["message"]
    assert post(url, "/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_api_key_is_required_except_for_health_and_metrics(serve, base):
    url = serve({"tiny-base": base}, api_key="s3cret")
    for key in (None, "wrong"):
        response = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"} if key else {})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer KEY" in response.json()["error"]["message"]
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError):
            intruder.completions.create(model="tiny-base", prompt="Hi", max_tokens=1)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as owner:
        assert owner.completions.create(model="tiny-base", prompt="Hi", max_tokens=1).choices
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def test_create_app_refuses_what_it_cannot_serve(aligned, base):
    with pytest.raises(ValueError, match="cannot share a name"):
        create_app({"x": base}, {"x": aligned})
    with OpenAIModel("remote", base_urls=["http://127.0.0.1:9/v1"]) as remote:  # constructing sends nothing
        with pytest.raises(TypeError, match="serves local weights as themselves"):
            create_app({"remote": remote})


# -- concurrency, disconnects, metrics ----------------------------------------------------------

def test_twenty_concurrent_clients_each_get_their_own_answer(url, client, tiny_base, base):
    prompts = [f"Client number {i} asks about topic {i * 7}:" for i in range(20)]
    expected = [base.complete([p], max_tokens=8, top_logprobs=2)[0] for p in prompts]
    # The served model reuses its prefix cache across requests, which recomputes nothing but
    # could round differently at an exact near-tie: these prompts have none (top-2 gaps > 1e-4).
    assert all(s.top[0].logprob - s.top[1].logprob > 1e-4 for c in expected for s in c.steps)
    assert len({c.text for c in expected}) == 20

    def ask(i: int) -> str:
        stream = i % 2 == 1
        response = client.completions.create(model="tiny-cached", prompt=prompts[i], max_tokens=8, temperature=0,
                                             stream=stream)
        return "".join(c.choices[0].text for c in response) if stream else response.choices[0].text

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert answers == [c.text for c in expected]


def test_a_client_that_leaves_mid_stream_stops_its_decoding(serve, base):
    class Counting(type(base)):
        """The served model, counting the tokens its streams produce."""

        produced: list[int] = []

        def stream(self, prompt, **kwargs):
            self.produced.append(0)
            for step in super().stream(prompt, **kwargs):
                self.produced[-1] += 1
                yield step

    model = Counting(base.model, base.tokenizer, name="counting", reuse_prefix=False)
    url = serve({"counting": model})
    budget = 2000
    with httpx.stream("POST", url + "/v1/completions", json={"model": "counting", "prompt": "Hi", "max_tokens": budget,
                                                              "stream": True, "temperature": 0}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
    # The next request waits for the model, so it runs once the abandoned one has stopped.
    follow = post(url, "/v1/completions", {"model": "counting", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert follow.status_code == 200
    abandoned, _ = model.produced
    assert 3 <= abandoned < budget / 2
    left = 'towline_requests_total{endpoint="/v1/completions",model="counting",status="499"} 1.0'
    assert eventually(lambda: left in httpx.get(url + "/metrics").text)


def eventually(condition, timeout: float = 20) -> bool:
    """Wait for ``condition()`` to hold (state another thread is about to reach)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_metrics_count_requests_tokens_and_latency(url, client):
    client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=3, temperature=0)
    post(url, "/v1/completions", {"model": "tiny-base", "prompt": "Hi", "max_tokens": -1})
    text = httpx.get(url + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['towline_requests_total{endpoint="/v1/completions",model="tiny-base",status="200"}'] >= 1
    assert values['towline_requests_total{endpoint="/v1/completions",model="",status="400"}'] >= 1
    assert values['towline_generation_tokens_total{model="tiny-base"}'] >= 3
    assert values['towline_prompt_tokens_total{model="tiny-base"}'] >= len(PROMPT.split())
    assert values['towline_request_seconds_count{endpoint="/v1/completions",model="tiny-base"}'] >= 1
    assert values['towline_requests_in_flight{model="tiny-base"}'] == 0
    assert not any(math.isnan(v) for v in values.values())
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_no_temperature_means_sampling_at_1_as_in_openai(client, base):
    for seed in (1, 2):
        served = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=12, seed=seed)
        local = base.complete([PROMPT], max_tokens=12, sampling=Sampling(temperature=1.0, seed=seed))[0]
        assert served.choices[0].text == local.text
    greedy = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=12, temperature=0)
    assert greedy.choices[0].text == base.complete([PROMPT], max_tokens=12, sampling=GREEDY)[0].text
