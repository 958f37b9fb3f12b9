"""Logit arithmetic (docs/logit-arithmetic.md): proxy-tuning / eft and the ensemble baseline.

The maths is pinned against a reference written here without any cache: at every step each
model reads its whole prompt plus the answer so far in one plain forward pass, and the
mixture is formed from those log-probs. Tiny random-init Llamas (conftest) run every rule
in seconds; the real models check the same on trained weights and over llama.cpp servers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
import torch
from transformers import LlamaForCausalLM

import towline
from towline.methods import METHODS, OptionError
from towline.methods.base import Participant
from towline.models.base import ModelError, Sampling
from towline.models.local import LocalModel
from towline.models.openai import OpenAIModel
from towline.prompts import PromptRequest, build_prompt

from killable_server import killable_server
from near_ties import NEAR_TIE_NATS

REQUEST = PromptRequest(question="Write a function that adds two numbers.", system="Be brief.")
CLEAR_REQUEST = PromptRequest(question="What is the capital of France?", system="Be brief.")
"""SmolLM2's proxy-tuned (α 0.5) greedy answer to this, 'The capital of France is Paris.',
keeps its two best tokens over 1.1 nats apart at each of its first 8 positions."""


class ForwardCounter:
    """Forward calls of a torch module and the columns (new positions) each was given."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.widths: list[int] = []
        self._handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: self.widths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()


def tiny_like(model: LocalModel, *, seed: int, name: str) -> LocalModel:
    """Another tiny Llama with ``model``'s config and tokenizer and its own random weights."""
    torch.manual_seed(seed)
    return LocalModel(LlamaForCausalLM(model.model.config).eval(), model.tokenizer, name=name)


@pytest.fixture(scope="module")
def tiny_tuned2(tiny_guide) -> LocalModel:
    return tiny_like(tiny_guide, seed=2, name="tiny-tuned2")


@pytest.fixture(scope="module")
def tiny_untuned2(tiny_guide) -> LocalModel:
    return tiny_like(tiny_guide, seed=4, name="tiny-untuned2")


def prompt_of(model, role: str, template: str | None = None, request: PromptRequest = REQUEST) -> str:
    chat = role.startswith("tuned") or role == "guide"
    return build_prompt(request, chat=chat, template=template, model_template=model.chat_template).text


def reference(models: Mapping[str, LocalModel], max_tokens: int, *, alphas=(), ensemble_k: int = 0,
              templates: Mapping[str, str] | None = None,
              request: PromptRequest = REQUEST) -> tuple[list[int], list[float]]:
    """Greedy logit arithmetic recomputed from scratch at every step: the token ids and, per
    step, the margin between the best and second-best mixed score."""
    prompts = {role: model.encode(prompt_of(model, role, (templates or {}).get(role), request))
               for role, model in models.items()}
    ends = set().union(*(m.end_ids for m in models.values()))
    ids: list[int] = []
    margins: list[float] = []
    for _ in range(max_tokens):
        lp = {}
        for role, model in models.items():
            with torch.inference_mode():
                logits = model.model(input_ids=torch.tensor([prompts[role] + ids])).logits[0, -1]
            lp[role] = torch.log_softmax(logits.double(), dim=-1)
        if ensemble_k:
            union = torch.zeros_like(lp["base"], dtype=torch.bool)
            for role in ("base", "guide"):
                union[lp[role].topk(ensemble_k).indices] = True
            scores = torch.where(union, torch.logaddexp(lp["base"], lp["guide"]), -torch.inf)
        else:
            scores = lp["base"].clone()
            for pair, alpha in enumerate(alphas, start=1):
                suffix = "" if pair == 1 else str(pair)
                scores += alpha * (lp[f"tuned{suffix}"] - lp[f"untuned{suffix}"])
        best = scores.topk(2)
        margins.append((best.values[0] - best.values[1]).item())
        token = int(best.indices[0])
        if token in ends:
            break
        ids.append(token)
    return ids, margins


def run(method: str, models: Mapping[str, object], request: PromptRequest = REQUEST, **options):
    return towline.generate(method=method, prompt=request, **models, **options)


# -- the arithmetic on tiny models ----------------------------------------------------------


def test_alpha_zero_is_base_only_greedy(tiny_base, tiny_guide, tiny_tuned2):
    base_only = towline.generate(method="base-only", base=tiny_base, prompt=REQUEST, max_tokens=12)
    for alpha in (0.0, [0.0]):
        result = run("proxy-tuning", {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2},
                     alpha=alpha, max_tokens=12)
        assert (result.text, result.tokens, result.stop_reason) == (base_only.text, 12, "length")
        assert result.steered_tokens == 0 and result.exact and result.alpha == [0.0]
        assert result.prompts["base"] == base_only.prompts["base"]


@pytest.mark.parametrize("alpha", [1.0, 0.6, -0.5, 3.0])
def test_one_pair_matches_recomputation_from_scratch(tiny_base, tiny_guide, tiny_tuned2, alpha):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2}
    ids, _ = reference(models, 10, alphas=[alpha])
    result = run("proxy-tuning", models, alpha=alpha, max_tokens=10)
    assert result.tokens == len(ids)
    assert result.text == tiny_base.tokenizer.decode(ids)
    base_only = towline.generate(method="base-only", base=tiny_base, prompt=REQUEST, max_tokens=10)
    if alpha >= 1:
        assert result.steered_tokens > 0 and result.text != base_only.text  # the pair really steers


def test_several_pairs_add_up(tiny_base, tiny_guide, tiny_tuned2, tiny_untuned2):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2,
              "tuned2": tiny_untuned2, "untuned2": tiny_guide}
    ids, _ = reference(models, 10, alphas=[0.8, -0.6])
    result = run("proxy-tuning", models, alpha=[0.8, -0.6], max_tokens=10)
    assert result.text == tiny_base.tokenizer.decode(ids) and result.alpha == [0.8, -0.6]
    assert set(result.prompts) == set(models)
    # One α for every pair.
    ids, _ = reference(models, 8, alphas=[0.7, 0.7])
    result = run("proxy-tuning", models, alpha=0.7, max_tokens=8)
    assert result.text == tiny_base.tokenizer.decode(ids) and result.alpha == [0.7, 0.7]


def test_a_pair_that_cancels_leaves_the_base(tiny_base, tiny_guide):
    """Tuned and untuned the same model on the same (chat) prompt: their difference is 0."""
    base_only = towline.generate(method="base-only", base=tiny_base, prompt=REQUEST, max_tokens=10)
    result = run("proxy-tuning", {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_guide},
                 untuned_template="chatml", alpha=2.5, max_tokens=10)
    assert result.text == base_only.text and result.steered_tokens == 0
    assert result.prompts["untuned"] == result.prompts["tuned"]


def test_base_as_its_own_untuned_twin_gives_the_tuned_model(tiny_base, tiny_guide):
    """base + (tuned − base) = tuned, when base and untuned are one model on one prompt."""
    tuned_alone = tiny_guide.complete([prompt_of(tiny_guide, "tuned")], max_tokens=10)[0]
    result = run("proxy-tuning", {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_base},
                 alpha=1.0, max_tokens=10)
    assert result.text == tuned_alone.text


def test_eft_is_proxy_tuning_under_another_name(tiny_base, tiny_guide, tiny_tuned2):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2}
    eft = run("eft", models, alpha=0.8, max_tokens=8)
    proxy = run("proxy-tuning", models, alpha=0.8, max_tokens=8)
    assert eft.method == "eft" and eft.text == proxy.text


@pytest.mark.parametrize("k", [1, 3, 50])
def test_ensemble_matches_recomputation(tiny_base, tiny_guide, k):
    models = {"base": tiny_base, "guide": tiny_guide}
    ids, _ = reference(models, 10, ensemble_k=k)
    result = run("ensemble", models, top_logprobs=k, max_tokens=10)
    assert result.text == tiny_base.tokenizer.decode(ids) and result.tokens == len(ids)
    assert set(result.to_dict()) >= {"exact", "steered_tokens", "steered_fraction"}


def test_one_cache_per_model_and_one_new_position_per_token(tiny_base, tiny_guide):
    """The tuned and untuned roles of one model share its state (one forward for both rows);
    after the prompts, every forward pass takes exactly one new position."""
    counters = {"base": ForwardCounter(tiny_base.model), "small": ForwardCounter(tiny_guide.model)}
    try:
        result = run("proxy-tuning", {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_guide},
                     max_tokens=9)
    finally:
        for counter in counters.values():
            counter.remove()
    assert result.tokens == 9 and result.model_calls == {"base": 9, "tuned": 9, "untuned": 9}
    for name, counter in counters.items():
        assert len(counter.widths) == 9  # the prompt, then one per token but the last
        assert counter.widths[1:] == [1] * 8
    small_prompts = [tiny_guide.encode(result.prompts[r]) for r in ("tuned", "untuned")]
    assert counters["small"].widths[0] == max(len(p) for p in small_prompts)


def test_budget_end_of_text_and_streamed_pieces(tiny_base, tiny_guide, tiny_tuned2, eos_biased):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2}
    pieces = []
    result = towline.generate(method="proxy-tuning", prompt=REQUEST, **models, max_tokens=7,
                              on_text=lambda piece, role: pieces.append((piece, role)))
    assert result.tokens == 7 and result.stop_reason == "length" and len(pieces) == 7
    assert "".join(p for p, _ in pieces) == result.text
    assert sum(role == "tuned" for _, role in pieces) == result.steered_tokens
    assert {role for _, role in pieces} <= {"base", "tuned"}
    # A model whose end of text always wins ends the answer at once, with nothing written.
    ending = eos_biased(tiny_guide, 1e4)
    result = run("proxy-tuning", {"base": ending, "tuned": tiny_guide, "untuned": tiny_tuned2},
                 alpha=0.0, max_tokens=7)
    assert (result.text, result.tokens, result.stop_reason) == ("", 0, "end")


def test_sampling_is_the_shared_sampler_with_the_base_settings(tiny_base, tiny_guide, tiny_tuned2):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2}
    sampling = Sampling(temperature=1.3, top_k=40, seed=11)
    first = run("proxy-tuning", models, base_sampling=sampling, max_tokens=10)
    again = run("proxy-tuning", models, base_sampling=sampling, max_tokens=10)
    other = run("proxy-tuning", models, base_sampling=Sampling(temperature=1.3, top_k=40, seed=12), max_tokens=10)
    greedy = run("proxy-tuning", models, max_tokens=10)
    assert first.text == again.text
    assert len({first.text, other.text, greedy.text}) > 1
    # With α = 0 the draws are those of the base alone, under the same seed.
    alone = towline.generate(method="base-only", base=tiny_base, prompt=REQUEST, sampling=sampling,
                             max_tokens=10)
    assert run("proxy-tuning", models, alpha=0.0, sampling=sampling, max_tokens=10).text == alone.text


def test_each_model_gets_its_own_prompt_and_templates_can_be_overridden(tiny_base, tiny_guide, tiny_tuned2):
    models = {"base": tiny_base, "tuned": tiny_guide, "untuned": tiny_tuned2}
    result = run("proxy-tuning", models, max_tokens=1)
    assert result.templates == {"base": "plain", "tuned": "model's own chat template", "untuned": "plain"}
    assert result.prompts["base"] == result.prompts["untuned"] == "Be brief.\nWrite a function that adds two numbers.\n"
    assert result.prompts["tuned"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    result = run("proxy-tuning", models, untuned_template="chatml", base_template="{{ messages[-1].content }}!",
                 max_tokens=1)
    assert result.templates["untuned"] == "family:chatml" and result.prompts["base"].endswith("numbers.!")


def test_different_vocabularies_are_refused_naming_both(tiny_base, tiny_guide, tiny_bpe):
    with pytest.raises(ModelError) as caught:
        run("proxy-tuning", {"base": tiny_base, "tuned": tiny_bpe, "untuned": tiny_guide}, max_tokens=3)
    message = str(caught.value)
    for part in ("base model tiny-base", "tuned model tiny-bpe", tiny_base.vocabulary, tiny_bpe.vocabulary):
        assert part in message
    with pytest.raises(ModelError, match="guide model tiny-bpe"):
        run("ensemble", {"base": tiny_base, "guide": tiny_bpe}, max_tokens=3)


def test_options_and_roles_are_checked_before_any_model_loads():
    unloadable = "no-such-model-anywhere"  # loading it would fail with another message
    with pytest.raises(OptionError, match="untuned2: --tuned2 needs --untuned2 too"):
        towline.compose(method="proxy-tuning", base=unloadable, tuned=unloadable, untuned=unloadable,
                        tuned2=unloadable)
    with pytest.raises(OptionError, match=r"alpha: give one value, or one per pair \(2\); got 3"):
        towline.compose(method="proxy-tuning", base=unloadable, tuned=unloadable, untuned=unloadable,
                        tuned2=unloadable, untuned2=unloadable, alpha=[1, 2, 3])
    with pytest.raises(OptionError, match="top_logprobs: must be at least 1"):
        METHODS["ensemble"](top_logprobs=0)
    with pytest.raises(OptionError, match="alpha: must be a finite number"):
        METHODS["proxy-tuning"](alpha=[math.inf])
    from towline.api import parse_option

    assert parse_option(METHODS["proxy-tuning"], "alpha", "0.5, -1") == [0.5, -1.0]


# -- real weights ------------------------------------------------------------------------


@pytest.mark.real_models
def test_qwen_coder_pair_real_weights(qwen_base, qwen_small):
    """The 1.5B Instruct on a plain prompt as base; the 0.5B Instruct with its chat template
    as tuned and on a plain prompt as untuned (no untuned 0.5B ships offline)."""
    assert qwen_base.vocabulary == qwen_small.vocabulary
    models = {"base": qwen_base, "tuned": qwen_small, "untuned": qwen_small}
    base_only = towline.generate(method="base-only", base=qwen_base, prompt=REQUEST, max_tokens=8)
    assert run("proxy-tuning", models, alpha=0.0, max_tokens=8).text == base_only.text
    ids, margins = reference(models, 8, alphas=[1.0])
    result = run("proxy-tuning", models, max_tokens=8)
    assert result.exact and result.tokens == len(ids)
    assert result.text == qwen_base.tokenizer.decode(ids)
    assert min(margins) > 1e-3  # no exact tie that float order could break either way
    assert result.templates == {"base": "plain", "tuned": "model's own chat template", "untuned": "plain"}


@pytest.mark.real_models
def test_cli_proxy_tuning_json(installed):
    installed("smollm2-135m-instruct")
    smol = "smollm2-135m-instruct"
    done = subprocess.run(
        [sys.executable, "-m", "towline.cli", "generate", "--method", "proxy-tuning", "--base", smol,
         "--tuned", smol, "--untuned", smol, "--alpha", "0.5", "--prompt", "What is 12 + 30?",
         "--max-tokens", "6", "--json"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["alpha"] == [0.5] and result["tokens"] == 6 and result["seconds"] > 0
    assert result["model_calls"] == {"base": 6, "tuned": 6, "untuned": 6} and result["exact"] is True


@pytest.mark.real_models
def test_gemma_and_smollm2_vocabularies_are_refused(gemma_base, smollm2_guide):
    with pytest.raises(ModelError, match="the base model gemma-3-270m and the tuned model "
                                         "smollm2-135m-instruct use different vocabularies"):
        run("proxy-tuning", {"base": gemma_base, "tuned": smollm2_guide, "untuned": smollm2_guide})


# -- over llama.cpp servers ----------------------------------------------------------------

SMOL_VOCABULARY = 49152


@pytest.fixture(scope="module")
def served_smol(smol_url, smollm2_guide) -> OpenAIModel:
    # The local model's template, so both backends build identical prompts.
    with OpenAIModel("smollm2-135m-instruct", base_urls=[smol_url], timeout=120,
                     chat_template=smollm2_guide.chat_template) as model:
        yield model


@pytest.mark.real_models
def test_server_top_k_approximation_agrees_with_local_exact(served_smol, smollm2_guide):
    """SmolLM2 in all three roles (base and untuned plain, tuned chat; α = 0.5 makes the
    mixture half base, half tuned). With K = the whole vocabulary the approximation drops
    nothing, so the server run is the exact arithmetic on llama.cpp's numerics: it agrees
    with local fp32 up to the first position whose best two tokens are nearly tied (closer
    than the two implementations can move them: near_ties.NEAR_TIE_NATS). The question is
    one whose greedy answer has no near-tie in its first tokens."""
    models = {"base": smollm2_guide, "tuned": smollm2_guide, "untuned": smollm2_guide}
    local = run("proxy-tuning", models, CLEAR_REQUEST, alpha=0.5, max_tokens=8)
    served = run("proxy-tuning", {"base": served_smol, "tuned": served_smol, "untuned": served_smol},
                 CLEAR_REQUEST, alpha=0.5, max_tokens=8, top_logprobs=SMOL_VOCABULARY)
    assert local.exact and not served.exact
    assert served.prompts == local.prompts and served.fallback_tokens == 0
    ids, margins = reference(models, 8, alphas=[0.5], request=CLEAR_REQUEST)
    assert local.text == smollm2_guide.tokenizer.decode(ids)
    near_tie = next((i for i, m in enumerate(margins) if m < NEAR_TIE_NATS), len(ids))
    assert near_tie >= 3, "the test prompt should open with clear choices"
    agreed = smollm2_guide.tokenizer.decode(ids[:near_tie])
    assert served.text.startswith(agreed)


@pytest.mark.real_models
def test_server_approximation_with_a_small_k(served_smol):
    models = {"base": served_smol, "tuned": served_smol, "untuned": served_smol}
    result = run("proxy-tuning", models, alpha=1.0, top_logprobs=5, max_tokens=6)
    assert not result.exact and result.model_calls == {"base": 6, "tuned": 6, "untuned": 6}
    assert 0 < result.tokens <= 6 and result.text
    ensemble = run("ensemble", {"base": served_smol, "guide": served_smol}, top_logprobs=5, max_tokens=6)
    assert not ensemble.exact and ensemble.text


@pytest.mark.real_models
def test_mixing_local_and_served_models_is_refused(served_smol, smollm2_guide):
    with pytest.raises(ModelError, match="not both"):
        run("proxy-tuning", {"base": smollm2_guide, "tuned": served_smol, "untuned": served_smol}, max_tokens=3)


@pytest.mark.real_models
def test_a_server_failing_mid_answer_keeps_the_partial_text(smol_gguf, tmp_path):
    """A server of its own, killed as the third token is shown: the answer so far comes back."""
    pieces = []
    with killable_server(smol_gguf, tmp_path) as server, \
            OpenAIModel("smollm2", base_urls=[server.url], max_retries=0, timeout=10) as served:

        def kill_at_the_third(piece: str, role: str) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                server.kill()

        models = {"base": Participant(served), "tuned": Participant(served, template="chatml"),
                  "untuned": Participant(served)}
        result = METHODS["proxy-tuning"](max_tokens=10, top_logprobs=5).run(
            REQUEST, models, on_text=kill_at_the_third)
    assert result.stop_reason == "error" and result.tokens == 3
    assert result.text == "".join(pieces) and result.text
    assert server.url in result.error
