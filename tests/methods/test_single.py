"""base-only and guide-only: the budget holds, greedy text is what ``complete`` gives, and a
server that dies mid-answer leaves the partial answer and the error."""

from __future__ import annotations

import pytest

from killable_server import killable_server
from towline.methods.base import Participant, PromptTooLong
from towline.methods.single import BaseOnly, GuideOnly
from towline.models.base import ModelError, Sampling
from towline.models.openai import OpenAIModel
from towline.prompts import FAMILIES, PromptRequest, build_prompt

REQUEST = PromptRequest(question="What is 2+2?", system="Answer briefly.")
STORY = PromptRequest(question="Write a long story about a dragon who learns to bake bread.")


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
@pytest.mark.parametrize("method", [BaseOnly, GuideOnly])
def test_never_more_than_max_tokens(tiny_base, tiny_guide, method, max_tokens):
    models = {"base": Participant(tiny_base), "guide": Participant(tiny_guide, template="chatml")}
    for sampling in (Sampling(), Sampling(temperature=1.0, seed=3)):
        models = {role: Participant(p.model, sampling, p.template) for role, p in models.items()}
        result = method(max_tokens=max_tokens).run(REQUEST, models)
        assert 1 <= result.tokens <= max_tokens
        assert result.stop_reason == ("length" if result.tokens == max_tokens else "end")
        assert result.error is None


BATCH = [PromptRequest(question=q) for q in ("What is 2+2?", "Name a red fruit.", "Why is the sky blue?",
                                                "Count to five, please, slowly and carefully.")]


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m.role }}: {{ m.content }}e\n"
                                                 "{% endfor %}assistant: "])
def test_a_batch_answers_as_one_request_at_a_time_does(tiny_guide, template):
    """Each answer of a greedy batch is the answer alone, token counts and stop reasons too,
    wherever the answer alone has no near-tie (padding a batch moves logits in their last bits)."""
    models = {"guide": Participant(tiny_guide, template=template)}
    method = GuideOnly(max_tokens=12)
    batched = method.run_batch(BATCH, models)
    compared = 0
    for request, together in zip(BATCH, batched, strict=True):
        alone = method.run(request, models)
        (completion,) = tiny_guide.complete([alone.prompts["guide"]], max_tokens=12, top_logprobs=2)
        if min(s.top[0].logprob - s.top[1].logprob for s in completion.steps) < 1e-4:
            continue
        compared += 1
        assert (together.text, together.tokens, together.stop_reason, together.prompts) == \
            (alone.text, alone.tokens, alone.stop_reason, alone.prompts)
    assert compared >= 2


def test_a_sampled_batch_draws_each_answer_alone(tiny_base):
    """Sampled answers do not depend on the batch they come in: the same seed, the same text."""
    models = {"base": Participant(tiny_base, Sampling(temperature=1.0, seed=5))}
    batched = BaseOnly(max_tokens=8).run_batch(BATCH, models)
    assert [r.text for r in batched] == [BaseOnly(max_tokens=8).run(r, models).text for r in BATCH]


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m.role }}: {{ m.content }}e\n"
                                                 "{% endfor %}assistant: "])
def test_greedy_text_is_what_complete_gives(tiny_guide, template):
    """Cut at the template's end-of-turn string too: ``e`` (the second template) turns up in
    the middle of the tiny model's tokens."""
    shown = []
    result = GuideOnly(max_tokens=40).run(REQUEST, {"guide": Participant(tiny_guide, template=template)},
                                          on_text=lambda piece, role: shown.append((piece, role)))
    prompt = build_prompt(REQUEST, chat=True, template=template)
    (completion,) = tiny_guide.complete([prompt.text], max_tokens=40, stop=[prompt.end_of_turn])
    assert result.prompts["guide"] == prompt.text
    assert result.text == completion.text
    assert "".join(piece for piece, _ in shown) == result.text
    assert {role for _, role in shown} == {"guide"}
    if completion.finish_reason == "stop":
        assert result.stop_reason == "end" and result.tokens <= len(completion.steps)


@pytest.mark.real_models
@pytest.mark.parametrize("method, role", [(BaseOnly, "base"), (GuideOnly, "guide")])
def test_greedy_text_is_what_complete_gives_on_real_models(gemma_base, smollm2_guide, method, role):
    model = {"base": gemma_base, "guide": smollm2_guide}[role]
    result = method(max_tokens=64).run(STORY, {role: Participant(model)})
    prompt = build_prompt(STORY, chat=role == "guide", model_template=model.chat_template)
    stop = [prompt.end_of_turn] if prompt.end_of_turn else []
    (completion,) = model.complete([prompt.text], max_tokens=64, stop=stop)
    assert result.text == completion.text and result.tokens == len(completion.steps)


@pytest.mark.real_models
def test_greedy_non_ascii_text_is_what_complete_gives(smollm2_guide):
    request = PromptRequest(question="Écris une phrase en français avec des émojis 🎉 et du chinois 你好.")
    result = GuideOnly(max_tokens=40).run(request, {"guide": Participant(smollm2_guide)})
    prompt = build_prompt(request, chat=True, model_template=smollm2_guide.chat_template)
    (completion,) = smollm2_guide.complete([prompt.text], max_tokens=40, stop=[prompt.end_of_turn])
    assert "🎉" in completion.text
    assert result.text == completion.text


@pytest.mark.real_models
def test_prompt_longer_than_the_context_is_refused_before_decoding(smollm2_guide):
    """SmolLM2 attends to 8192 tokens: a 20,000-word question does not fit."""
    long = PromptRequest(question="word " * 20_000)
    with pytest.raises(PromptTooLong, match=r"guide prompt is 200\d\d tokens .* guide model "
                                            r"smollm2-135m-instruct has a context of 8192 tokens"):
        GuideOnly(max_tokens=16).run(long, {"guide": Participant(smollm2_guide)})
    with pytest.raises(PromptTooLong, match=r"max_tokens 100000000 does not fit the guide model "
                                            r"smollm2-135m-instruct, whose context is 8192 tokens"):
        GuideOnly(max_tokens=100_000_000).run(REQUEST, {"guide": Participant(smollm2_guide)})


@pytest.mark.real_models
def test_server_that_dies_mid_answer_leaves_the_partial_answer(smol_gguf, smol_url, tmp_path):
    template = FAMILIES["chatml"]
    with OpenAIModel("smollm2", base_urls=[smol_url], chat_template=template) as alive:
        whole = GuideOnly(max_tokens=300).run(STORY, {"guide": Participant(alive)})
    assert whole.stop_reason in ("end", "length") and whole.tokens > 20

    with killable_server(smol_gguf, tmp_path) as server, \
            OpenAIModel("smollm2", base_urls=[server.url], chat_template=template) as model:
        shown = []

        def kill_on_first_piece(piece: str, role: str) -> None:
            if not shown:
                server.kill()
            shown.append(piece)

        result = GuideOnly(max_tokens=300).run(STORY, {"guide": Participant(model)}, on_text=kill_on_first_piece)
    assert result.stop_reason == "error"
    assert server.url in result.error and "closed the connection in the middle of an answer" in result.error
    assert result.text and whole.text.startswith(result.text)
    assert "".join(shown) == result.text
    assert 0 < result.tokens < whole.tokens


@pytest.mark.real_models
def test_a_server_failing_before_the_first_token_raises(smol_url):
    with OpenAIModel("smollm2", base_urls=[smol_url], chat_template=FAMILIES["chatml"]) as model:
        with pytest.raises(ModelError, match="context is 2048 tokens"):
            GuideOnly(max_tokens=8).run(PromptRequest(question="word " * 3000), {"guide": Participant(model)})
        # The server said its context: the next prompt that cannot fit is refused before any request.
        assert model.context_length == 2048
        with pytest.raises(PromptTooLong, match="context of 2048 tokens"):
            GuideOnly(max_tokens=8).run(PromptRequest(question="word " * 2500), {"guide": Participant(model)})
