"""What the GSM8K speed benchmarks share: the request they ask, the model pairs they run (and
the loop that runs them), and a count of forward passes. Imported by the scripts beside it (run
as ``python bench/NAME.py``, Python puts this folder on the path) and by the speed tests."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from towline.eval import datasets
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


def run_pairs(chosen: dict[str, Pair], run: Callable[[Pair, list[str]], dict]) -> None:
    """``run(pair, questions)`` for each pair, on its first GSM8K questions, one thread; prints
    each pair's result as it comes, then the whole report (with each pair's ``ratio``, where
    its result has one) as the last line."""
    torch.set_num_threads(1)  # the machines are small and shared
    rows = datasets.load("gsm8k")
    started = time.perf_counter()
    report: dict = {"threads": 1, "pairs": {}}
    for name, pair in chosen.items():
        result = run(pair, [row["question"] for row in rows[: pair.questions]])
        result.update(questions=pair.questions, max_tokens=pair.max_tokens)
        report["pairs"][name] = result
        print(json.dumps({name: result}), flush=True)
    ratios = {name: result["ratio"] for name, result in report["pairs"].items() if "ratio" in result}
    if ratios:
        report["ratio"] = ratios
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


class Passes:
    """Counts the forward passes of torch modules (one model and its copies, or several)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.count = 0
        self._handles = [module.register_forward_pre_hook(self._hook) for module in modules]

    def _hook(self, module, args) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
