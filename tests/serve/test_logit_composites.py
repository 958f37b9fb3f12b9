"""Logit-arithmetic composites behind ``towline serve``: the served answer is the local one,
the end of text included, and optional roles may be left out of a composite."""

from __future__ import annotations

import openai
import pytest

import towline
from towline.serve.config import ServeConfig, open_all, parse_compose

QUESTION = "What is 12 + 30?"


@pytest.fixture(scope="module")
def served(serve, base, guide, eos_biased):
    """proxy-tuning over the tiny models, and one whose base ends its text at once."""
    steered = towline.compose(method="proxy-tuning", base=base, tuned=guide, untuned=base, max_tokens=12)
    ending = towline.compose(method="proxy-tuning", base=eos_biased(base, 1e4), tuned=guide, untuned=base,
                             alpha=0.0, max_tokens=12)
    url = serve({}, {"proxy": steered, "ending": ending})
    return url, steered, ending


def test_served_proxy_tuning_is_the_local_answer_and_stops_at_the_end_of_text(served):
    url, steered, ending = served
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        for name, aligned in (("proxy", steered), ("ending", ending)):
            local = aligned.generate(QUESTION)
            (choice,) = client.completions.create(model=name, prompt=QUESTION).choices
            assert choice.text == local.text
            assert choice.finish_reason == ("length" if local.stop_reason == "length" else "stop")
            assert choice.model_extra["towline"]["steered_tokens"] == local.steered_tokens
    assert ending.generate(QUESTION).stop_reason == "end"


def test_a_composite_leaves_optional_roles_out(tiny_base, tmp_path):
    tiny_base.model.save_pretrained(tmp_path)
    tiny_base.tokenizer.save_pretrained(tmp_path)
    config = ServeConfig()
    name, method, options = parse_compose(f"pt=proxy-tuning(base={tmp_path}, tuned={tmp_path}, untuned={tmp_path})")
    config.composites[name] = (method, options)
    opened = open_all(config)
    try:
        assert set(opened.composites["pt"].participants) == {"base", "tuned", "untuned"}
    finally:
        opened.close()
