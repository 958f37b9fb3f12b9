"""Tests for the search scorers (towline.methods.scorers) and incremental scoring
(:meth:`Model.open_scoring`): cached scores equal full re-scoring, for every kind of scorer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForSequenceClassification

from towline.methods.scorers import (FunctionScorer, ImplicitValue, RewardModel, open_scorer, parse_scorer)
from towline.models.base import ModelError, RescoringState
from towline.models.local import LocalModel
from towline.models.local_scoring import CachedScoring
from towline.prompts import PromptRequest, build_prompt

PROMPT = "A short story about a cat:\n"
STORY = " The cat sat on the mat, and goodness me, it was happy!\n\n  Then it slept. 猫は寝た。"


def full_scores(model, prompts, texts):
    return [s.logprob for s in model.score(prompts, texts)]


def chunks_of(text, cuts):
    """Prefixes of ``text`` ending at each cut, in order (a candidate growing chunk by chunk)."""
    return [text[:cut] for cut in sorted(set(cuts)) if cut <= len(text)] + [text]


# -- incremental scoring --------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STORY)), min_size=1, max_size=6))
def test_cached_scoring_equals_full_rescoring_at_any_chunk_boundaries(tiny_guide, cuts):
    # Boundaries fall mid-word and mid-character run: re-tokenising merges across them, which
    # the cache must notice ("good" + "ness").
    state = tiny_guide.open_scoring([PROMPT, PROMPT])
    for prefix in chunks_of(STORY, cuts):
        texts = [prefix, prefix[: len(prefix) // 2]]
        assert state.score(texts) == pytest.approx(full_scores(tiny_guide, [PROMPT] * 2, texts), abs=1e-3)


def test_cached_scoring_follows_reordered_rows(tiny_guide):
    prompts = [PROMPT, "Another prompt, longer than the first one:\n", PROMPT]
    state = tiny_guide.open_scoring(prompts)
    texts = [" The cat", " A dog barked", " The cat sat"]
    state.score(texts)
    state.reorder([2, 2, 1])  # a row copied twice, one dropped
    prompts = [prompts[2], prompts[2], prompts[1]]
    texts = [" The cat sat on", " The cat sat still", " A dog barked twice"]
    assert state.score(texts) == pytest.approx(full_scores(tiny_guide, prompts, texts), abs=1e-3)
    state.reorder([1, 0])
    texts = [" The cat sat still and purred", " The cat sat on it"]
    assert state.score(texts) == pytest.approx(full_scores(tiny_guide, prompts[1::-1], texts), abs=1e-3)


def test_cached_scoring_reads_only_what_changed(tiny_guide, monkeypatch):
    shapes = []
    forward = tiny_guide.model.forward

    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_guide.model, "forward", counting)
    state = tiny_guide.open_scoring([PROMPT] * 3)
    text = " The cat sat on the mat and looked around the room"
    state.score([text[:20]] * 3)
    state.score([text[:20], text, text[:20]])
    prompt_tokens = len(tiny_guide.encode(PROMPT))
    new_tokens = len(tiny_guide.encode(PROMPT + text)) - len(tiny_guide.encode(PROMPT + text[:20]))
    # The shared prompt is read once for all rows; then each pass reads only new tokens (and
    # the last kept one again: the cache holds no output distribution for it).
    assert shapes[0] == (1, prompt_tokens)
    assert len(shapes) == 3 and shapes[2][1] <= new_tokens + 2


def test_scoring_without_reuse_rereads_everything_and_agrees(tiny_guide):
    texts = [" The cat", " The cat sat on the mat"]
    cached = CachedScoring(tiny_guide, [PROMPT] * 2)
    fresh = CachedScoring(tiny_guide, [PROMPT] * 2, reuse=False)
    generic = RescoringState(tiny_guide, [PROMPT] * 2)
    for grown in (texts, [t + " again" for t in texts]):
        expected = full_scores(tiny_guide, [PROMPT] * 2, grown)
        for state in (cached, fresh, generic):
            assert state.score(grown) == pytest.approx(expected, abs=1e-3)


def test_sliding_window_models_score_exactly(smollm2_tokenizer):
    # Holes left by dropped tokens would shift a sliding window; such a state starts over.
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=12, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=512, bos_token_id=smollm2_tokenizer.bos_token_id,
                              eos_token_id=smollm2_tokenizer.eos_token_id, pad_token_id=smollm2_tokenizer.pad_token_id)
    model = LocalModel(Gemma3ForCausalLM(config).eval(), smollm2_tokenizer, name="tiny-gemma3")
    state = model.open_scoring([PROMPT] * 2)
    for prefix in chunks_of(STORY, [5, 11, 30, 31, 60]):
        texts = [prefix, prefix + " more"]
        assert state.score(texts) == pytest.approx(full_scores(model, [PROMPT] * 2, texts), abs=1e-3)


@pytest.mark.real_models
def test_cached_scoring_on_a_real_model(smollm2_guide):
    prompt = build_prompt(PromptRequest(question="Write a movie review."), chat=True,
                          model_template=smollm2_guide.chat_template).text
    review = (" I went in expecting little and came out delighted: the pacing is brisk, the jokes "
              "land, and the final twist is earned. Recommended!")
    state = smollm2_guide.open_scoring([prompt] * 2)
    for cut in (17, 40, 41, 90, len(review)):
        texts = [review[:cut], review[: cut // 2]]
        assert state.score(texts) == pytest.approx(full_scores(smollm2_guide, [prompt] * 2, texts), abs=2e-3)


# -- implicit value -------------------------------------------------------------------------


def test_implicit_value_is_the_log_ratio_under_each_models_own_prompt(tiny_guide, tiny_bpe):
    # The untuned model has a different tokenizer and vocabulary: responses are scored as text.
    request = PromptRequest(question="Tell a story.", system="Be brief.", answer_start="Once")
    scorer = ImplicitValue(tiny_guide, tiny_bpe, tuned_template="chatml", untuned_system="Be long.")
    scoring = scorer.start(request, rows=2)
    tuned_prompt = build_prompt(request, chat=True, template="chatml").text
    untuned_prompt = "Be long.\nTell a story.\nOnce"
    assert scoring.prompts == {"tuned": tuned_prompt, "untuned": untuned_prompt}
    assert scoring.templates == {"tuned": "family:chatml", "untuned": "plain"}
    for texts in ([" upon", " there"], [" upon a time", " there was"]):
        expected = [t - u for t, u in zip(full_scores(tiny_guide, [tuned_prompt] * 2, texts),
                                          full_scores(tiny_bpe, [untuned_prompt] * 2, texts))]
        assert scoring.score(texts) == pytest.approx(expected, abs=2e-3)
    assert scoring.calls == {"tuned": 2, "untuned": 2}


def test_the_same_model_with_and_without_an_instruction(tiny_guide):
    scorer = ImplicitValue(tiny_guide, tiny_guide, tuned_template="chatml", untuned_template="chatml",
                           tuned_system="Be positive.")
    scoring = scorer.start(PromptRequest(question="Review it."), rows=1)
    assert "Be positive." in scoring.prompts["tuned"] and "Be positive." not in scoring.prompts["untuned"]
    assert scoring.score([" Great fun."])[0] != 0.0
    same = ImplicitValue(tiny_guide, tiny_guide).start(PromptRequest(question="Review it."), rows=1)
    assert same.prompts["tuned"] != same.prompts["untuned"]  # chat template vs plain (docs/prompts.md)


# -- functions and reward models ------------------------------------------------------------


def vowels(prompt: str, response: str) -> float:
    return sum(response.count(v) for v in "aeiou") - 0.01 * len(prompt)


def test_function_scorer_from_a_spec(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text("def shouting(prompt, response):\n    return response.count('!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    request = PromptRequest(question="Cheer.", answer_start="Go")
    for spec in ("function:my_scores:shouting", f"function:{tmp_path / 'my_scores.py'}:shouting"):
        with open_scorer(spec) as scorer:
            scoring = scorer.start(request, rows=3)
            assert scoring.score(["!", " team!!", "!"]) == [1.0, 2.0, 1.0]
            assert scoring.calls == {"function": 1}
            scoring.score(["!", " team!!", "!"])  # nothing new: nothing is asked again
            assert scoring.calls == {"function": 1}


def test_function_scorer_gets_question_and_whole_answer():
    seen = []
    scorer = FunctionScorer(lambda prompt, response: seen.append((prompt, response)) or 0.0)
    scorer.start(PromptRequest(question="Q?", answer_start="A:"), rows=1).score([" yes"])
    assert seen == [("Q?", "A: yes")]
    bad = FunctionScorer(lambda prompt, response: math.nan).start(PromptRequest(question="Q?"), rows=1)
    with pytest.raises(ValueError, match="finite"):
        bad.score(["x"])


@pytest.fixture(scope="module")
def tiny_classifier(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama sequence classifier with labels NEGATIVE/POSITIVE, saved to disk."""
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                         pad_token_id=smollm2_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("classifier")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer = type(smollm2_tokenizer).from_pretrained(smollm2_tokenizer.name_or_path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_the_label_log_odds(tiny_classifier):
    scorer = open_scorer(f"reward:{tiny_classifier}@positive")
    reference = LlamaForSequenceClassification.from_pretrained(tiny_classifier).eval()
    answer = "Great film. I loved it."
    scoring = scorer.start(PromptRequest(question="Review:", answer_start="Great film."), rows=2)
    got = scoring.score([" I loved it.", " I loved it."])
    with torch.inference_mode():
        logits = reference(**scorer.tokenizer(answer, return_tensors="pt")).logits[0]
    assert got == pytest.approx([(logits[1] - logits[0]).item()] * 2, abs=1e-5)
    assert scoring.calls == {"reward": 1}
    scorer.close()


def test_reward_model_needs_a_label_when_it_has_several(tiny_classifier):
    with pytest.raises(Exception, match="2 labels .*NEGATIVE, POSITIVE.*@POSITIVE"):
        RewardModel(str(tiny_classifier))
    with pytest.raises(Exception, match="no label 'happy'"):
        RewardModel(str(tiny_classifier), "happy")


def test_a_missing_reward_model_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in (str(tmp_path / "no-such-folder"), "someone/no-such-reward-model"):
        with pytest.raises(ModelError, match=f"(?s)could not load reward model '{re.escape(source)}'.*local directory or a Hugging Face id"):
            open_scorer(f"reward:{source}")


def test_bad_specs_say_what_to_write():
    for spec, message in [("beam:x", "implicit:TUNED,UNTUNED, reward:MODEL"), ("implicit:a,b,c", "two models"),
                          ("reward:", "needs a model"), ("function:nomodule", "MODULE:NAME")]:
        with pytest.raises(ValueError, match=message):
            parse_scorer(spec)


@pytest.mark.real_models
def test_implicit_value_over_a_server_scores_each_candidates_whole_text(gemma_url):
    from towline.methods.search import ChunkBeamSearch
    from towline.methods.base import Participant
    from towline.models.base import Sampling
    from towline.models.openai import OpenAIModel

    # gemma: llama-cpp-python echoes log-probs one token off for models without a BOS token
    # (smollm2), which towline refuses; gemma has one.
    served = f"openai:gemma-3-270m@{gemma_url}"
    request = PromptRequest(question="Write a movie review.")
    with open_scorer(f"implicit:{served},{served}", tuned_template="plain", tuned_system="You loved the movie.") as scorer:
        search = ChunkBeamSearch(w=2, k=2, l=3, max_tokens=6, scorer=scorer, all_candidates=True)
        base = Participant(OpenAIModel("gemma-3-270m", base_urls=[gemma_url]), Sampling(temperature=0.8, top_k=8, seed=5))
        result = search.run(request, {"base": base})
        assert result.error is None
        assert result.model_calls["tuned"] == result.model_calls["untuned"] == result.selections == 2
        # Servers re-score in full: each kept candidate's score is the implicit value of its
        # whole text, as the same scorer gives it on its own (row bookkeeping across selections).
        for candidate in result.candidates:
            alone = scorer.start(request, rows=1).score([candidate.text])[0]
            assert candidate.score == pytest.approx(alone, abs=0.05)
        assert result.score == result.candidates[0].score >= result.candidates[1].score
