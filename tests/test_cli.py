"""The command line as a user runs it: real processes, real offline models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from killable_server import killable_server
from test_api import LATEX, float_options
from towline.cli import app, flag
from towline.models import registry

GSM8K_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                  "clips in May. How many clips did Natalia sell altogether in April and May?")


def towline(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "towline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600,
                          input=input)


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
                   "Question: What is 12 + 30?\nAnswer:", "--max-tokens", "16", "--json")
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


# -- bad input: refused before any model loads, in the user's terms ----------------------------
# TOWLINE_HOME is an empty folder: a model load would fail with "towline models pull", so an
# option's own error shows that nothing was loaded.


def refused(*args: str, home) -> str:
    """Run ``towline generate ARGS`` in-process; it must fail with exit code 2 before loading a
    model. Returns the error text."""
    done = CliRunner().invoke(app, ["generate", *args], env={"TOWLINE_HOME": str(home)})
    assert done.exit_code == 2, done.output
    assert "towline models pull" not in done.output
    assert "Traceback" not in done.output
    return " ".join(done.output.split())  # rich wraps long lines


@pytest.mark.parametrize("method, option, value", float_options())
def test_every_float_option_refuses_nan_and_inf(tmp_path, method, option, value):
    for text in ("nan", "inf", "-inf"):
        error = refused("--method", method, "--prompt", "Hi", flag(option), text, home=tmp_path)
        assert f"error: {flag(option)}: must be a finite number, got {text}" in error


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--base-temperature", "--guide-top-p"])
def test_sampling_flags_refuse_nan_and_inf(tmp_path, option):
    for text in ("nan", "inf"):
        error = refused("--prompt", "Hi", option, text, home=tmp_path)
        assert f"error: {option}: must be a finite number, got {text}" in error


@pytest.mark.parametrize("gamma", ["-0.1", "1.5"])
def test_gamma_outside_zero_to_one_is_refused(tmp_path, gamma):
    error = refused("--prompt", "Hi", "--gamma", gamma, home=tmp_path)
    assert f"error: --gamma: must be between 0 and 1, got {gamma}" in error


@pytest.mark.parametrize("option", ["--seed", "--guide-seed"])
def test_a_seed_beyond_64_bits_is_refused(tmp_path, option):
    error = refused("--prompt", "Hi", "--temperature", "1", option, str(2**64), home=tmp_path)
    assert f"error: {option}: must be between 0 and 2**63 - 1, got {2**64}" in error


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m.content }}", "the Jinja template does not compile (line 1: Unexpected end"),
    ("{{ messages[0].content.nope() }}", "the Jinja template fails on a one-question conversation"),
    ("chatmll", "unknown template 'chatmll'"),
])
def test_a_broken_template_is_refused_before_any_model_loads(tmp_path, template, problem):
    error = refused("--prompt", "Hi", "--guide-template", template, home=tmp_path)
    assert f"error: --guide-template: {problem}" in error


@pytest.mark.parametrize("args, message", [
    ((), "error: --prompt: give the question with --prompt TEXT or --prompt-file PATH (- for stdin)"),
    (("--prompt", "Hi", "--prompt-file", "q.txt"), "error: --prompt: give the question with --prompt TEXT"),
    (("--prompt-file", "/no/such/file"), "error: --prompt-file: cannot read /no/such/file: No such file"),
    (("--prompt", "Hi", "--max-tokens", "0"), "error: --max-tokens: must be at least 1, got 0"),
    (("--prompt", "Hi", "--max-tokens", "many"), "error: --max-tokens: must be a whole number, got 'many'"),
    (("--prompt", "Hi", "--gama", "0.3"), "error: --gama: not an option of method 'nudging' (did you mean --gamma?)"),
    (("--prompt", "Hi", "--guide-temperature", "warm"), "error: --guide-temperature: must be a number"),
])
def test_errors_name_cli_flags(tmp_path, args, message):
    error = refused(*args, home=tmp_path)
    assert message in error
    for python_name in ("max_tokens", "_template", "prompt_file", "template=", "top_p"):
        assert python_name not in error


def test_a_chat_model_without_a_template_names_the_flag(tmp_path):
    error = refused("--method", "guide-only", "--guide", "openai:my-chat@http://127.0.0.1:9/v1",
                    "--prompt", "Hi", home=tmp_path)
    assert "error: --guide-template: the guide model my-chat has no chat template of its own" in error


# -- prompts: verbatim, from a file or standard input ----------------------------------------


@pytest.mark.real_models
def test_latex_and_multi_line_prompts_reach_the_model_verbatim(smol_url, tmp_path):
    # A served model: the prompt is all this test is about, and no weights need loading.
    common = ["generate", "--method", "base-only", "--base", f"openai:smollm2-135m-instruct@{smol_url}",
              "--max-tokens", "1", "--json"]
    done = towline(*common, "--prompt", LATEX, "--system", r"Use \LaTeX.")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompts"]["base"] == f"Use \\LaTeX.\n{LATEX}\n"

    question = f"Line one: {LATEX}\n\n  Line three, indented.\t(tab)"
    path = tmp_path / "question.txt"
    path.write_text(question + "\n", encoding="utf-8")  # as an editor saves it
    from_file = towline(*common, "--prompt-file", str(path))
    from_stdin = towline(*common, "--prompt-file", "-", input=question + "\n")
    for done in (from_file, from_stdin):
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["prompts"]["base"] == question + "\n"


# -- context and budget ------------------------------------------------------------------------


@pytest.mark.real_models
def test_a_prompt_beyond_the_context_is_refused_before_decoding(installed, tmp_path):
    """SmolLM2 attends to 8192 tokens: a 20,000-word question, or a budget of 10^8 tokens, is
    refused with the model, its context and the length, and nothing is decoded."""
    installed("smollm2-135m-instruct")
    path = tmp_path / "long.txt"
    path.write_text("word " * 20_000, encoding="utf-8")
    common = ["generate", "--method", "guide-only", "--guide", "smollm2-135m-instruct"]
    done = towline(*common, "--prompt-file", str(path))
    assert done.returncode == 2 and not done.stdout
    error = " ".join(done.stderr.split())
    assert "the guide prompt is 200" in error
    assert ("tokens and the answer may add 256 more (--max-tokens), but the guide model smollm2-135m-instruct "
            "has a context of 8192 tokens: shorten the prompt or lower --max-tokens") in error

    done = towline(*common, "--prompt", "Hi", "--max-tokens", "100000000")
    assert done.returncode == 2 and not done.stdout
    assert ("error: --max-tokens 100000000 does not fit the guide model smollm2-135m-instruct, whose "
            "context is 8192 tokens: lower --max-tokens") in " ".join(done.stderr.split())


@pytest.mark.real_models
def test_a_prompt_beyond_a_servers_context_is_refused(smol_url):
    done = towline("generate", "--method", "guide-only", "--guide", f"openai:smollm2-135m-instruct@{smol_url}",
                   "--prompt", "word " * 3000)
    assert done.returncode == 2 and not done.stdout
    error = " ".join(done.stderr.split())
    assert (f"error: the request does not fit model smollm2-135m-instruct at {smol_url}, whose context is "
            "2048 tokens") in error


@pytest.mark.real_models
def test_a_server_url_without_v1_gets_a_hint(smol_url):
    root = smol_url.removesuffix("/v1")
    done = towline("generate", "--method", "guide-only", "--guide", f"openai:smollm2-135m-instruct@{root}",
                   "--prompt", "Hi")
    assert done.returncode == 2
    assert f"The URL probably lacks /v1: try {smol_url}" in " ".join(done.stderr.split())


# -- nothing lost ------------------------------------------------------------------------------


@pytest.mark.real_models
def test_a_server_killed_mid_answer_leaves_the_partial_answer(smol_gguf, smol_url, tmp_path):
    question = "Write a long story about a dragon who learns to bake bread."
    common = ["generate", "--method", "guide-only", "--prompt", question, "--max-tokens", "100", "--json"]
    whole = towline(*common, "--guide", f"openai:smollm2-135m-instruct@{smol_url}")
    assert whole.returncode == 0, whole.stderr
    whole = json.loads(whole.stdout)

    with killable_server(smol_gguf, tmp_path) as server:
        server.kill_after(tokens=10)
        done = towline(*common, "--guide", f"openai:smollm2-135m-instruct@{server.url}")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["stop_reason"] == "error"
    assert f"{server.url} closed the connection in the middle of an answer" in result["error"]
    assert result["text"] and whole["text"].startswith(result["text"])
    assert 0 < result["tokens"] < whole["tokens"]
    assert "(the partial answer is above)" in " ".join(done.stderr.split())
