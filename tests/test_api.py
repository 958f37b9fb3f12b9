"""The Python API refuses bad input with a clear error before any model loads, and takes
prompts verbatim.

Where a check must come before loading, TOWLINE_HOME points at an empty folder: loading a
registry model there fails with "towline models pull ...", so getting the option's own error
instead shows that nothing was loaded.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

import towline
from towline.methods import METHODS, OptionError
from towline.methods.base import PromptTooLong
from towline.models.base import Sampling
from towline.prompts import PromptRequest

NON_FINITE = [math.nan, math.inf, -math.inf]
LATEX = r"Show that $\nabla \times \mathbf{F} \neq 0$ where \text{F} = (y, -x, 0)\n, \t and \\."


def float_options() -> list[tuple[str, str, typing.Any]]:
    """Every float option of every registered method: (method, option, a value holding nan)."""
    found = []
    for name, cls in METHODS.items():
        for field in dataclasses.fields(cls):
            annotation = typing.get_type_hints(cls)[field.name]
            kinds = typing.get_args(annotation) or (annotation,)
            if float in kinds:
                found.append((name, field.name, math.nan))
            elif any(typing.get_origin(k) is list and typing.get_args(k) == (float,) for k in kinds):
                found.append((name, field.name, [0.5, math.nan]))
    return found


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWLINE_HOME", str(tmp_path))
    with pytest.raises(Exception, match="towline models pull"):  # what loading would say here
        towline.generate(method="base-only", base="gemma-3-270m", prompt="Hi")


def test_float_options_exist():
    assert ("nudging", "gamma", math.nan) in float_options()


@pytest.mark.parametrize("method, option, value", float_options())
def test_every_float_option_refuses_non_finite_values(empty_home, method, option, value):
    with pytest.raises(OptionError, match=rf"^{option}: must be a finite number, got .*nan"):
        towline.generate(method=method, prompt="Hi", **{option: value})
    if not isinstance(value, list):
        for bad in NON_FINITE[1:]:
            with pytest.raises(OptionError, match=rf"^{option}: must be a finite number, got -?inf"):
                towline.generate(method=method, prompt="Hi", **{option: bad})


@pytest.mark.parametrize("gamma", [-0.1, 1.5, 2])
def test_gamma_outside_zero_to_one_is_refused(empty_home, gamma):
    with pytest.raises(OptionError, match=rf"^gamma: must be between 0 and 1, got {gamma}"):
        towline.generate(method="nudging", prompt="Hi", gamma=gamma)


@pytest.mark.parametrize("setting", ["temperature", "top_p"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_sampling_refuses_non_finite_values(setting, value):
    with pytest.raises(ValueError, match=rf"{setting} must be a finite number"):
        Sampling(**{setting: value})


def test_seed_beyond_64_bits_is_refused():
    for seed in (2**63, 2**64, -1):
        with pytest.raises(ValueError, match=r"seed must be between 0 and 2\*\*63 - 1"):
            Sampling(temperature=1.0, seed=seed)


@pytest.mark.parametrize("template, problem", [
    ("{% for m in messages %}{{ m.content }}", "does not compile"),
    ("{{ messages[0].content.nope() }}", "fails on a one-question conversation"),
    ("chatmll", "unknown template 'chatmll'"),
])
def test_a_broken_template_is_refused_before_any_model_loads(empty_home, template, problem):
    with pytest.raises(OptionError, match=rf"^guide_template: .*{problem}"):
        towline.generate(method="nudging", prompt="Hi", guide_template=template)


@pytest.mark.parametrize("prompt", [None, 42, ["Hi"]])
def test_prompt_must_be_text(empty_home, prompt):
    with pytest.raises(OptionError, match=rf"^prompt: must be a string or a PromptRequest, got {type(prompt).__name__}"):
        towline.generate(method="base-only", prompt=prompt)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": "16"}, r"^max_tokens: must be int, got '16'"),
    ({"max_tokens": True}, r"^max_tokens: must be int, got True"),
    ({"max_tokens": 0}, r"^max_tokens: must be at least 1, got 0"),
    ({"base": 3}, r"^base: must be a model spec string or an open Model"),
    ({"sampling": 0.7}, r"^sampling: must be a towline.Sampling"),
    ({"max_token": 16}, r"^max_token: not an option of method 'base-only' \(did you mean max_tokens\?\)"),
])
def test_argument_types_and_ranges_are_checked(empty_home, kwargs, message):
    with pytest.raises(OptionError, match=message):
        towline.generate(method="base-only", prompt="Hi", **kwargs)


def test_a_chat_model_without_a_template_names_the_template_option():
    # A server model that is not in the registry brings no chat template; no request is sent.
    with pytest.raises(OptionError, match=r"^guide_template: the guide model my-chat has no chat template"):
        towline.generate(method="guide-only", guide="openai:my-chat@http://127.0.0.1:9/v1", prompt="Hi")


def test_latex_reaches_the_model_verbatim(tiny_base, tiny_guide):
    request = PromptRequest(question=LATEX, system=r"Use \LaTeX: \frac{a}{b}.")
    result = towline.generate(method="base-only", base=tiny_base, prompt=request, max_tokens=1)
    assert result.prompts["base"] == f"{request.system}\n{LATEX}\n"
    result = towline.generate(method="guide-only", guide=tiny_guide, prompt=LATEX, max_tokens=1,
                              guide_template="chatml")
    assert f"<|im_start|>user\n{LATEX}<|im_end|>" in result.prompts["guide"]


def test_a_prompt_beyond_the_context_is_refused_before_decoding(tiny_base):
    """The tiny model attends to 2048 tokens."""
    with pytest.raises(PromptTooLong, match=r"the base prompt is 300\d tokens and the answer may add 16 more "
                                            r"\(max_tokens\), but the base model tiny-base has a context of "
                                            r"2048 tokens"):
        towline.generate(method="base-only", base=tiny_base, prompt="word " * 3000, max_tokens=16)
    with pytest.raises(PromptTooLong, match=r"max_tokens 100000000 does not fit the base model tiny-base, "
                                            r"whose context is 2048 tokens: lower max_tokens"):
        towline.generate(method="base-only", base=tiny_base, prompt="Hi", max_tokens=100_000_000)
