"""OpenAIModel against real llama.cpp servers (llama-cpp-python), no mocks."""

from __future__ import annotations

import math
from contextlib import closing
import socket

import pytest

from towline.models.base import ModelError, Sampling, Token
from killable_server import killable_server
from towline.models.openai import OpenAIModel

pytestmark = pytest.mark.real_models


def chatml(question: str, answer_start: str = "") -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_start}"


SHORT_ANSWER = chatml("What is 2+2? Answer with one number.")
"""SmolLM2 answers this greedily with a short sentence holding ``4`` (``The answer is 4.`` here) and
ends its turn."""
PLAIN = "The capital of France is"


@pytest.fixture(scope="module")
def smol(smol_url):
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60) as model:
        yield model


@pytest.fixture(scope="module")
def gemma(gemma_url):
    with OpenAIModel("gemma", base_urls=[gemma_url], timeout=60) as model:
        yield model


def texts_and_logprobs(steps):
    return [(s.token.text, round(s.token.logprob, 4)) for s in steps]


def test_greedy_completion_is_coherent_and_deterministic(smol):
    prompts = [chatml("What is the capital of France?")] * 2
    first = smol.complete(prompts, max_tokens=8)
    again = smol.complete(prompts[:1], max_tokens=8)
    assert "Paris" in first[0].text
    assert first[0].text == first[1].text == again[0].text
    assert texts_and_logprobs(first[0].steps) == texts_and_logprobs(again[0].steps)


def test_steps_hold_sorted_top_k_and_top1_prob(smol):
    (completion,) = smol.complete([PLAIN], max_tokens=5, top_logprobs=4)
    assert completion.finish_reason == "length"
    assert len(completion.steps) == 5
    assert "".join(s.token.text for s in completion.steps) == completion.text
    for step in completion.steps:
        assert len(step.top) == 4
        assert [t.logprob for t in step.top] == sorted((t.logprob for t in step.top), reverse=True)
        assert step.top[0].text == step.token.text  # greedy takes the best token
        assert 0 < step.top1_prob <= 1


def test_model_ending_its_turn_is_end_without_an_empty_step(smol):
    """What the answer says is llama.cpp's numerics on this CPU (a near-tie may part another
    CPU's from it): what is checked is how its end is reported, from the answer itself."""
    answers = [smol.complete([SHORT_ANSWER], max_tokens=30, stop=stop)[0] for stop in ((), ("\n\n",))]
    for completion in answers:
        assert "4" in completion.text
        assert completion.finish_reason == "end" and completion.ended
        assert completion.steps and all(s.token.text for s in completion.steps)  # no step for the end of text
        assert "".join(s.token.text for s in completion.steps) == completion.text
    assert answers[0].text == answers[1].text


def test_stop_string_and_length(smol):
    (whole,) = smol.complete([SHORT_ANSWER], max_tokens=30)
    (stopped,) = smol.complete([SHORT_ANSWER], max_tokens=30, stop=["4"])
    assert stopped.text == whole.text[:whole.text.index("4")]
    assert stopped.finish_reason == "stop"
    assert "".join(s.token.text for s in stopped.steps) == stopped.text
    (cut,) = smol.complete([SHORT_ANSWER], max_tokens=3)
    assert (cut.text, cut.finish_reason, len(cut.steps)) == \
        ("".join(s.token.text for s in whole.steps[:3]), "length", 3)
    assert smol.complete([SHORT_ANSWER], max_tokens=0)[0].finish_reason == "length"


@pytest.mark.parametrize("prompt, max_tokens", [(SHORT_ANSWER, 30), (PLAIN, 6)])
def test_stream_yields_the_steps_of_complete(smol, prompt, max_tokens):
    (completion,) = smol.complete([prompt], max_tokens=max_tokens, top_logprobs=3)
    streamed = list(smol.stream(prompt, max_tokens=max_tokens, top_logprobs=3))
    assert texts_and_logprobs(streamed) == texts_and_logprobs(completion.steps)
    assert [s.top for s in streamed] == [s.top for s in completion.steps]


def test_seeded_sampling_is_repeatable_and_rows_differ(smol):
    sampling = Sampling(temperature=1.0, seed=7)
    first = smol.complete([PLAIN] * 3, max_tokens=4, sampling=sampling)
    again = smol.complete([PLAIN] * 3, max_tokens=4, sampling=sampling)
    assert [c.text for c in first] == [c.text for c in again]
    assert len({c.text for c in first}) > 1


def test_requests_go_round_robin_over_the_urls(smol_url, gemma_url):
    """Two servers with different models: each answer shows which server made it."""
    with OpenAIModel("m", base_urls=[smol_url], timeout=60) as one:
        smol_text = one.complete([PLAIN], max_tokens=2)[0].text
    with OpenAIModel("m", base_urls=[gemma_url], timeout=60) as one:
        gemma_text = one.complete([PLAIN], max_tokens=2)[0].text
    assert smol_text != gemma_text
    with OpenAIModel("m", base_urls=[smol_url, gemma_url], timeout=60) as both:
        texts = [c.text for c in both.complete([PLAIN] * 4, max_tokens=2)]
        later = both.complete([PLAIN], max_tokens=2)[0].text
    assert texts == [smol_text, gemma_text, smol_text, gemma_text]
    assert later == smol_text


def closed_port_url() -> str:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{unused.getsockname()[1]}/v1"  # nothing listens there


@pytest.mark.parametrize("retries, tries", [(0, "1 try"), (2, "3 tries")])
def test_server_down_is_a_clear_error_counting_the_real_tries(retries, tries):
    url = closed_port_url()
    with OpenAIModel("m", base_urls=[url], max_retries=retries, timeout=3) as model:
        with pytest.raises(ModelError, match=rf"cannot reach {url} for model m: connection refused "
                                             rf"\({tries}\)\. Is the server running\?"):
            model.complete(["Hi"], max_tokens=1)
        with pytest.raises(ModelError, match=url):
            model.count_tokens("Hi")


def test_url_without_v1_gets_a_hint(smol_url):
    root = smol_url.removesuffix("/v1")
    with OpenAIModel("m", base_urls=[root], max_retries=0) as model:
        with pytest.raises(ModelError, match=rf"{root} refused a request for model m \(HTTP 404, 1 try\): "
                                             rf"Not Found\. The URL probably lacks /v1: try {smol_url}$"):
            model.complete(["Hi"], max_tokens=1)


def test_server_killed_mid_stream_is_one_try_cut_short(smol_gguf, tmp_path):
    """The client retries a request, never a stream that has begun."""
    with killable_server(smol_gguf, tmp_path) as server, OpenAIModel("m", base_urls=[server.url]) as model:
        stream = model.stream(SHORT_ANSWER, max_tokens=200)
        next(stream)
        server.kill()
        with pytest.raises(ModelError, match=rf"{server.url} closed the connection in the middle of an "
                                             r"answer of model m \(1 try\): the server stopped or crashed"):
            list(stream)


def test_server_killed_mid_request_reports_each_retry(smol_gguf, tmp_path):
    """A completion cut off is sent again; the server is gone, so the retries are refused."""
    with killable_server(smol_gguf, tmp_path) as server, \
            OpenAIModel("m", base_urls=[server.url], max_retries=2) as model:
        server.kill_after(tokens=5)
        with pytest.raises(ModelError, match=rf"cannot reach {server.url} for model m: connection refused "
                                             r"\(3 tries\)"):
            model.complete([chatml("Write a long story about a dragon.")], max_tokens=1000)


def test_context_length_unknown_until_the_server_says_it(smol_url):
    """llama-cpp-python lists no context length; a prompt that does not fit makes it say one."""
    with OpenAIModel("m", base_urls=[smol_url], timeout=60) as model:
        assert model.context_length is None
        with pytest.raises(ModelError, match=rf"the request does not fit model m at {smol_url}, whose "
                                             r"context is 2048 tokens: shorten the prompt .*3001 in your prompt"):
            model.complete(["hello " * 3000], max_tokens=1)
        assert model.context_length == 2048


def test_decode_state_next_append_reorder(smol):
    prompts = [PLAIN, SHORT_ANSWER]
    greedy = smol.complete(prompts, max_tokens=2)
    state = smol.open(prompts)
    first = state.next(top_logprobs=3)
    assert [len(d.top) for d in first] == [3, 3] and all(d.full is None for d in first)
    assert [d.top[0].text for d in first] == [c.steps[0].token.text for c in greedy]
    assert math.isclose(first[0].top[0].logprob, greedy[0].steps[0].token.logprob, abs_tol=1e-4)

    state.append([d.top[0] for d in first])
    assert state.texts == [c.steps[0].token.text for c in greedy]
    second = state.next(top_logprobs=3)
    assert [d.top[0].text for d in second] == [c.steps[1].token.text for c in greedy]

    state.reorder([1, 1, 0])
    assert state.texts == [greedy[1].steps[0].token.text] * 2 + [greedy[0].steps[0].token.text]
    reordered = state.next(top_logprobs=3)
    assert [d.top for d in reordered] == [second[1].top, second[1].top, second[0].top]


def test_next_reports_the_end_of_text_token(smol):
    """llama.cpp returns no log-probs when the next token ends the text; ``next`` still gets
    the distribution, with the end-of-turn token as ``""``."""
    state = smol.open([SHORT_ANSWER + "The answer is 4."])
    (distribution,) = state.next(top_logprobs=3)
    assert distribution.top[0].text == ""
    assert 0.3 < math.exp(distribution.top[0].logprob) < 1


def test_count_tokens_matches_the_server_tokenizer(smol, gemma, smol_gguf, gemma_gguf):
    import llama_cpp

    text = "Question: What is 12 + 30?\nAnswer: 42 <|im_end|>"
    for model, gguf in ((smol, smol_gguf), (gemma, gemma_gguf)):
        vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        expected = len(vocab.tokenize(text.encode(), add_bos=False, special=True))
        assert model.count_tokens(text) == expected
        assert model.count_tokens("") == 0
        vocab.close()


def test_score_refuses_a_server_with_misaligned_echo(smol, smol_url):
    with pytest.raises(ModelError, match=rf"{smol_url} cannot score given text.*vLLM"):
        smol.score([PLAIN], [" Paris."])


def test_score_matches_generation_where_echo_works(gemma):
    (completion,) = gemma.complete([PLAIN], max_tokens=3)
    scored = gemma.score([PLAIN, PLAIN], [completion.text, ""], top_logprobs=2)
    assert [s.token.text for s in scored[0].steps] == [s.token.text for s in completion.steps]
    for given, generated in zip(scored[0].steps, completion.steps):
        assert abs(given.token.logprob - generated.token.logprob) < 0.3
        assert len(given.top) == 2
    assert math.isclose(scored[0].logprob, sum(s.token.logprob for s in scored[0].steps))
    assert scored[1].steps == []



def test_decode_state_extend_truncate_close(smol):
    prompts = [PLAIN, SHORT_ANSWER]
    greedy = smol.complete(prompts, max_tokens=3, top_logprobs=3)
    drafts = [[s.token for s in greedy[0].steps], [s.token for s in greedy[1].steps[:1]]]  # ragged
    with smol.open(prompts) as state:
        extended = state.extend(drafts, top_logprobs=3)
        assert [len(row) for row in extended] == [3, 1]
        assert state.texts == [greedy[0].text, greedy[1].steps[0].token.text]
        # Each position's distribution is the one after appending the tokens one by one.
        for row, draft in enumerate(drafts):
            with smol.open([prompts[row]]) as one:
                for token, got in zip(draft, extended[row]):
                    one.append([token])
                    (want,) = one.next(top_logprobs=3)
                    assert [t.text for t in got.top] == [t.text for t in want.top]
        assert extended[0][0].top[0].text == greedy[0].steps[1].token.text
        state.truncate([2, 1])
        assert state.texts == [greedy[0].steps[0].token.text, ""]
        again = state.next(top_logprobs=3)
        assert again[0].top[0].text == greedy[0].steps[1].token.text
        assert again[1].top[0].text == greedy[1].steps[0].token.text
        with pytest.raises(ValueError, match="row 1 has 0 appended tokens"):
            state.truncate([0, 1])
        with pytest.raises(ValueError, match="takes tokens by text"):
            state.append([5, 6])
    with pytest.raises(ValueError, match="closed"):
        state.next()


def test_end_of_text_and_vocabulary_of_served_models(smol_url):
    from towline.models import load_model

    with load_model(f"openai:smollm2-135m-instruct@{smol_url}") as known, \
            load_model(f"openai:my-model@{smol_url}") as unknown:
        assert known.vocabulary == "smollm2-49k" and unknown.vocabulary is None
        assert known.is_end(Token("", -0.1)) and not known.is_end(Token(" Paris", -0.1))
    with OpenAIModel("m", base_urls=[smol_url], end_texts=["<|im_end|>"]) as tagged:  # as vLLM shows it
        assert tagged.is_end(Token("<|im_end|>", 0.0)) and not tagged.is_end(Token("", 0.0))


def test_requests_and_received_tokens_are_counted(smol_url):
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60) as model:
        (completion,) = model.complete([PLAIN], max_tokens=5)
        with closing(model.stream(PLAIN, max_tokens=8)) as stream:
            next(stream), next(stream)  # read two steps, then leave
        assert model.count_tokens("Hello world") == 2
        # The tokenizer's route is found with one request, then asked once.
        assert dict(model.requests) == {"/v1/completions": 2, "/tokenize": 1, "/extras/tokenize": 2}
        assert model.tokens_received == len(completion.steps) + 2 == 7


def test_a_matching_tokenizer_counts_without_requests(smol_url, smol_gguf, gemma_gguf):
    from towline.models import load_model, registry

    text, longer = "Question: What is 12 + 30?\nAnswer: 42 <|im_end|>", "Ünïcödé, 日本語 and more\n"
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60) as server_only:
        expected = {text: server_only.count_tokens(text), longer: server_only.count_tokens(longer)}
    smol_tokenizer = registry.local_weights("smollm2-135m-instruct")
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60, tokenizer=str(smol_tokenizer)) as model:
        assert model.count_tokens(text) == expected[text]
        checked = dict(model.requests)  # the probes, counted by the server once
        assert model.count_tokens(longer) == expected[longer]
        assert model.count_tokens("") == 0
        assert dict(model.requests) == checked
    with load_model(f"openai:smollm2-135m-instruct@{smol_url}") as known:
        assert known.tokenizer == str(smol_tokenizer)
    # Gemma's tokenizer splits the probes otherwise: the server keeps counting, and says so.
    gemma_tokenizer = registry.local_weights("gemma-3-270m")
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60, tokenizer=str(gemma_tokenizer)) as model:
        with pytest.warns(UserWarning, match=rf"gemma.* counts .* where the server at {smol_url} counts"):
            assert model.count_tokens(text) == expected[text]
        asked = sum(model.requests.values())
        assert model.count_tokens(longer) == expected[longer]
        assert sum(model.requests.values()) == asked + 1


def test_a_tokenizer_that_does_not_load_says_so(smol_url, tmp_path):
    with OpenAIModel("smollm2", base_urls=[smol_url], timeout=60, tokenizer=str(tmp_path)) as model:
        with pytest.raises(ModelError, match=rf"(?s)could not load the tokenizer '{tmp_path}' of smollm2: .*folder"):
            model.count_tokens("Hello world")
