"""Nudging over OpenAI-compatible servers (real llama.cpp servers on 127.0.0.1), and the
same run on local weights of the same GGUF files.

llama.cpp computes with the quantized weights and its own kernels; the local backend
de-quantizes them to fp32 and runs transformers. Greedy runs therefore agree until the
first near-tie that the two sets of numerics break differently (tests/near_ties.py): the
tests assert agreement up to the first difference, and that it is a near-tie.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llama_server import start as start_llama_server
from near_ties import Recorded, assert_same_up_to_a_near_tie

from towline.methods.base import Participant
from towline.methods.nudging import nudge
from towline.methods.single import BaseOnly
from towline.models.openai import OpenAIModel
from towline.prompts import PromptRequest

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


def test_local_and_server_agree_up_to_a_near_tie(served_base, served_guide, gemma_base, smollm2_guide):
    # The base alone.
    served, local = Recorded(served_base), Recorded(gemma_base)
    over_http = BaseOnly(max_tokens=24).run(REQUEST, {"base": Participant(served)})
    on_cpu = BaseOnly(max_tokens=24).run(REQUEST, {"base": Participant(local)})
    assert over_http.prompts == on_cpu.prompts
    found = assert_same_up_to_a_near_tie((served.calls, local.calls))
    if found is None:
        assert over_http.text == on_cpu.text
    else:
        assert over_http.text.startswith(found.before) and on_cpu.text.startswith(found.before)

    # Nudging: the same calls to base and guide, in one order, up to the first difference;
    # the rounds that ended before it are the same.
    runs = {}
    for backend, base, guide in [("http", served_base, served_guide), ("cpu", gemma_base, smollm2_guide)]:
        clock = itertools.count()  # one numbering for both models' calls
        base, guide = Recorded(base, clock), Recorded(guide, clock)
        ends: list[int] = []  # a tick of the clock as each round ends

        def round_ended(piece: str, role: str, ends: list[int] = ends, clock: itertools.count = clock) -> None:
            if role == "base":
                ends.append(next(clock))

        result = nudge(base=base, guide=guide, request=REQUEST, max_tokens=48, on_text=round_ended)
        runs[backend] = result, base, guide, ends
    (over_http, http_base, http_guide, ends), (on_cpu, cpu_base, cpu_guide, _) = runs["http"], runs["cpu"]
    assert over_http.prompts == on_cpu.prompts
    found = assert_same_up_to_a_near_tie((http_base.calls, cpu_base.calls), (http_guide.calls, cpu_guide.calls),
                                         threshold=0.4)
    same = len(over_http.rounds) if found is None else sum(end < found.order for end in ends)
    assert over_http.rounds[:same] == on_cpu.rounds[:same]
    if found is None:
        assert over_http.text == on_cpu.text


def test_cross_family_nudging_over_http_with_a_named_template(served_base, smol_url):
    guide = OpenAIModel("smollm2-135m-instruct", base_urls=[smol_url])
    result = nudge(base=served_base, guide=guide, request="What is 12 + 30?", guide_template="chatml",
                   max_tokens=24)
    assert result.prompts["guide"].startswith("<|im_start|>user\nWhat is 12 + 30?")
    assert result.templates["guide"] == "family:chatml"
    assert result.text.strip()


# -- a server that dies mid-answer --------------------------------------------------------


@pytest.fixture
def doomed_server(smol_gguf: Path, tmp_path: Path):
    """A llama.cpp server of the test's own (SmolLM2), for the test to kill: its URL, its
    process and its log."""
    log = tmp_path / "server.log"
    process, url = start_llama_server(smol_gguf, log)
    try:
        yield url, process, log
    finally:
        process.kill()
        process.wait()


def test_a_server_dying_mid_answer_leaves_the_answer_so_far(doomed_server):
    url, process, _ = doomed_server
    model = OpenAIModel("smollm2-135m-instruct", base_urls=[url], max_retries=0)
    seen: list[str] = []

    def kill_after_the_first_round(piece: str, role: str) -> None:
        seen.append(piece)
        if role == "base" and process.poll() is None:
            process.kill()
            process.wait()

    result = nudge(base=model, guide=model, request=REQUEST, guide_template="chatml", max_tokens=48,
                   on_text=kill_after_the_first_round)
    assert result.stop_reason == "error"
    assert url in result.error and "Is the server running?" in result.error
    (first,) = result.rounds
    assert first.nudging_words and result.text == first.nudging_words + first.base_text == "".join(seen)
    assert result.tokens == result.guide_tokens + result.base_tokens > 0


def test_cli_prints_the_partial_answer_and_fails_when_a_server_dies(doomed_server, smol_url):
    url, process, log = doomed_server
    # The guide behind the server that dies, the base behind one that lives: the guide's
    # second request means the first round is over.
    command = [sys.executable, "-m", "towline.cli", "generate", "--method", "nudging",
               "--base", f"openai:smollm2-135m-instruct@{smol_url}", "--guide", f"openai:smollm2-135m-instruct@{url}",
               "--guide-template", "chatml", "--system", REQUEST.system, "--question-prefix", REQUEST.question_prefix,
               "--prompt", REQUEST.question, "--max-tokens", "48", "--json"]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while log.read_text().count("POST /v1/completions") < 2:
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "the guide was not asked twice in 300 s"
            time.sleep(0.05)
        process.kill()
        out, err = cli.communicate(timeout=300)
    finally:
        cli.kill()
    assert cli.returncode == 1, err
    assert "the partial answer is above" in err
    result = json.loads(out)
    assert result["stop_reason"] == "error" and url in result["error"]
    assert result["rounds"] and result["text"].strip()
    assert result["text"] == "".join(r["nudging_words"] + r["base_text"] for r in result["rounds"])
