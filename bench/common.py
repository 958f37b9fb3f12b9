"""What the GSM8K speed benchmarks share: the request they ask, the model pairs they run, and
a count of forward passes. Imported by the scripts beside it (run as ``python bench/NAME.py``,
Python puts this folder on the path)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from towline.prompts import PromptRequest

SYSTEM = "Answer the question by walking through the reasoning steps."


def request_for(question: str) -> PromptRequest:
    """A GSM8K question as every speed benchmark asks it."""
    return PromptRequest(question=question, system=SYSTEM, question_prefix="Question: ")


@dataclass(frozen=True)
class Pair:
    """A base and its guide, with how many questions and tokens a benchmark runs by default."""

    base: str
    guide: str
    questions: int
    max_tokens: int


BASES = {"gemma": ("gemma-3-270m", "smollm2-135m-instruct"),
         "qwen": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")}
"""The bundled pair, and the Qwen pair (one vocabulary; its base on a plain prompt)."""


def pairs(*, gemma: tuple[int, int], qwen: tuple[int, int]) -> dict[str, Pair]:
    """Both pairs, each with its default (questions, max_tokens)."""
    sizes = {"gemma": gemma, "qwen": qwen}
    return {name: Pair(*BASES[name], *sizes[name]) for name in BASES}


def add_pair_options(parser: argparse.ArgumentParser, defaults: dict[str, Pair]) -> None:
    """``--pairs``, ``--questions`` and ``--max-tokens``."""
    questions = " and ".join(str(pair.questions) for pair in defaults.values())
    tokens = " and ".join(str(pair.max_tokens) for pair in defaults.values())
    parser.add_argument("--pairs", default=",".join(defaults), help=f"comma-separated, of: {', '.join(defaults)}")
    parser.add_argument("--questions", type=int, help=f"questions per pair (default: per pair, {questions})")
    parser.add_argument("--max-tokens", type=int, help=f"tokens per answer (default: per pair, {tokens})")


def chosen_pairs(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 defaults: dict[str, Pair]) -> dict[str, Pair]:
    """The pairs ``--pairs`` names, with ``--questions`` and ``--max-tokens`` applied."""
    names = [name.strip() for name in args.pairs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(defaults))
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}: choose from {', '.join(defaults)}")
    return {name: dataclasses.replace(defaults[name], questions=args.questions or defaults[name].questions,
                                      max_tokens=args.max_tokens or defaults[name].max_tokens) for name in names}


class Passes:
    """Counts the forward passes of torch modules (one model and its copies)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.count = 0
        for module in modules:
            module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1
