"""Nudging answers run together, as ``towline eval --batch-size`` runs them, against one at a time.

    python bench/batched_nudging.py                   # both pairs, ~8 minutes
    python bench/batched_nudging.py --pairs gemma --questions 4

For each pair, on the first GSM8K questions (the copy bundled with towline), greedy, one
thread, the same loaded models (``LocalModel.load``: packed layers, drafts):

- ``one_at_a_time``: each question answered by itself (``generate``);
- ``together``: all the questions answered together (``generate_batch``, which runs the
  answers side by side and merges their waiting model calls into batched passes);
- ``base_only_one_at_a_time`` and ``base_only_together``: the base alone, for context (its
  greedy answers decode as one padded batch).

``ratio`` = nudging's output tokens/s together ÷ one at a time. Forward passes of each model
are counted, and the texts compared (equal up to near-ties: batched passes round differently).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import time

from towline.api import compose
from towline.models.local import LocalModel

from common import Pair, Passes, add_pair_options, chosen_pairs, pairs, request_for, run_pairs  # bench/, this script's folder

PAIRS = pairs(gemma=(8, 64), qwen=(4, 48))


def run_pair(pair: Pair, questions: list[str]) -> dict:
    base, guide = LocalModel.load(pair.base), LocalModel.load(pair.guide)
    nudging = compose(method="nudging", base=base, guide=guide, max_tokens=pair.max_tokens)
    base_only = compose(method="base-only", base=base, max_tokens=pair.max_tokens)
    passes = {"base": Passes(base.model), "guide": Passes(guide.model)}
    warm_up = [request_for("What is 2 + 3?"), request_for("What is 4 + 4?")]
    nudging.generate_batch(warm_up)  # first passes of each shape allocate; not counted
    base_only.generate_batch(warm_up)
    requests = [request_for(q) for q in questions]
    sides = {
        "one_at_a_time": lambda: [nudging.generate(r) for r in requests],
        "together": lambda: nudging.generate_batch(requests),
        "base_only_one_at_a_time": lambda: [base_only.generate(r) for r in requests],
        "base_only_together": lambda: base_only.generate_batch(requests),
    }
    report: dict = {"base": pair.base, "guide": pair.guide}
    texts = {}
    for side, answer in sides.items():
        before = {name: counter.count for name, counter in passes.items()}
        started = time.perf_counter()
        results = answer()
        seconds = time.perf_counter() - started
        tokens = sum(r.tokens for r in results)
        texts[side] = [r.text for r in results]
        report[side] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 3),
                        "forward_passes": {name: counter.count - before[name] for name, counter in passes.items()}}
    report["same_texts"] = sum(a == b for a, b in zip(texts["one_at_a_time"], texts["together"]))
    report["base_only_same_texts"] = sum(
        a == b for a, b in zip(texts["base_only_one_at_a_time"], texts["base_only_together"]))
    report["ratio"] = round(report["together"]["tokens_per_second"] / report["one_at_a_time"]["tokens_per_second"], 3)
    report["together_to_base_only_together"] = round(
        report["together"]["tokens_per_second"] / report["base_only_together"]["tokens_per_second"], 3)
    nudging.close()
    base_only.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_options(parser, PAIRS)
    args = parser.parse_args()
    chosen = chosen_pairs(parser, args, PAIRS)
    run_pairs(chosen, run_pair)


if __name__ == "__main__":
    main()
