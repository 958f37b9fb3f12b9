"""The command line as a user runs it: real processes, real offline models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from towline.models import registry

GSM8K_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                  "clips in May. How many clips did Natalia sell altogether in April and May?")


def towline(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "towline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def test_models_lists_the_registry(installed):
    installed("smollm2-135m-instruct")
    done = towline("models")
    assert done.returncode == 0, done.stderr
    for name in registry.REGISTRY:
        assert name in done.stdout
    smollm2_row = next(line for line in done.stdout.splitlines() if "smollm2-135m-instruct" in line)
    assert "instruct" in smollm2_row and "yes" in smollm2_row


def test_missing_model_says_how_to_install_it(tmp_path):
    done = towline("generate", "--method", "base-only", "--base", "gemma-3-270m", "--prompt", "Hi",
                   env={"TOWLINE_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert "towline models pull gemma-3-270m" in done.stderr


def test_corrupt_model_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    path = registry.gguf_path("smollm2-135m-instruct")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a model")
    done = towline("generate", "--method", "guide-only", "--guide", "smollm2-135m-instruct", "--prompt", "Hi",
                   env={"TOWLINE_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert "damaged" in done.stderr and "towline models pull smollm2-135m-instruct" in done.stderr


def test_bad_input_gets_a_clear_error():
    done = towline("generate", "--method", "beam", "--prompt", "Hi")
    assert done.returncode == 2 and "choose one of nudging, base-only, guide-only" in done.stderr
    done = towline("generate", "--base", "openai:no-url", "--method", "base-only", "--prompt", "Hi")
    assert done.returncode == 2 and "openai:MODEL@URL" in done.stderr


@pytest.mark.real_models
def test_base_only_equals_plain_transformers_greedy(installed):
    installed("gemma-3-270m")
    done = towline("generate", "--method", "base-only", "--base", "gemma-3-270m", "--prompt",
                   r"Question: What is 12 + 30?\nAnswer:", "--max-tokens", "16", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) >= {"text", "stop_reason", "tokens", "model_calls", "seconds"}
    prompt = result["prompts"]["base"]
    assert prompt == "Question: What is 12 + 30?\nAnswer:\n"

    folder = registry.local_weights("gemma-3-270m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert result["text"] == expected
    assert result["tokens"] == 16 and result["stop_reason"] == "length"


@pytest.mark.real_models
def test_nudging_on_the_bundled_models(installed):
    installed("gemma-3-270m")
    installed("smollm2-135m-instruct")
    common = ["generate", "--method", "nudging", "--base", "gemma-3-270m", "--guide", "smollm2-135m-instruct",
              "--system", "Answer the question by walking through the reasoning steps.",
              "--question-prefix", "Question: ", "--prompt", GSM8K_QUESTION, "--max-tokens", "64", "--json"]
    done = towline(*common, "--gamma", "0.4")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["text"].strip()
    assert 0 < result["guide_token_fraction"] < 1
    assert result["model_calls"]["base"] > 0 and result["model_calls"]["guide"] > 0
    assert len(result["rounds"]) == len(result["nudging_words"])

    done = towline(*common, "--gamma", "0")
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)["rounds"][0]
    # With gamma 0 the base is always ready: the guide gives one word, then the base writes
    # its own greedy continuation until its end of text, the budget or a repetition guard.
    from towline.models.local import LocalModel

    base = LocalModel.load("gemma-3-270m")
    prompt = json.loads(done.stdout)["prompts"]["base"] + first["nudging_words"]
    greedy = base.complete([prompt], max_tokens=64)[0].text
    assert first["base_text"] and greedy.startswith(first["base_text"])
