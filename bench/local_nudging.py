"""Nudging on local weights against the base model alone: output tokens per second.

    python bench/local_nudging.py                      # both pairs, ~10 minutes on a shared CPU
    python bench/local_nudging.py --pairs qwen --questions 2 --max-tokens 64
    python bench/local_nudging.py --pairs gemma --profile   # where nudging's time goes

For each pair, on the first GSM8K questions (the copy bundled with towline), with the same
base model and the same plain base prompt, in one process, one thread, question by question
(so that the machine's load falls alike on both sides), greedy:

- ``nudging``: the base nudged by the guide (gamma 0.4, 16-token chunks), as ``LocalModel.load``
  sets models up (linear layers packed for the CPU, drafts checked);
- ``nudging_adaptive``: the same with ``adapt_proposals`` (off the rules: each proposal as long
  as the base needed of the last one, plus two tokens);
- ``base_only``: the base alone, plain greedy decoding (a forward pass a token, as
  ``model.generate`` does), on the same packed layers;
- ``base_only_stock``: the same on PyTorch's stock layers (``pack=False``: what
  transformers runs);
- ``base_only_drafted``: the base alone on towline's fast path, for comparison.

``ratio`` = nudging's output tokens/s ÷ the faster of the two plain base-alone sides'
(``ratio_adaptive`` likewise, with ``adaptive_same_texts``: whether its answers were the rules'
answers). Forward passes of each model per output token are counted too. The last line printed
is one JSON object. With ``--profile``, nudging alone runs under cProfile and the top entries
are printed instead of a ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats

from towline.api import compose
from towline.models.local import LocalModel

from common import Pair, Passes, add_pair_options, chosen_pairs, pairs, request_for, run_pairs  # bench/, this script's folder

# The Qwen base takes several times longer per token here: fewer, shorter answers keep each
# pair within about five minutes.
PAIRS = pairs(gemma=(3, 128), qwen=(2, 64))


def run_pair(pair: Pair, questions: list[str], *, profile: bool) -> dict:
    base, guide = LocalModel.load(pair.base), LocalModel.load(pair.guide)
    max_tokens = pair.max_tokens
    sides = {"nudging": compose(method="nudging", base=base, guide=guide, max_tokens=max_tokens)}
    base_copies = [base.model]
    if not profile:
        # The same weights decoding one forward pass a token, as plain greedy decoding does.
        plain_base = LocalModel(base.model, base.tokenizer, name=pair.base, draft=False)
        stock_base = LocalModel.load(pair.base, pack=False, draft=False)
        base_copies.append(stock_base.model)
        sides["nudging_adaptive"] = compose(method="nudging", base=base, guide=guide, max_tokens=max_tokens,
                                            adapt_proposals=True)
        sides["base_only"] = compose(method="base-only", base=plain_base, max_tokens=max_tokens)
        sides["base_only_stock"] = compose(method="base-only", base=stock_base, max_tokens=max_tokens)
        sides["base_only_drafted"] = compose(method="base-only", base=base, max_tokens=max_tokens)
    counters = {"base": Passes(*base_copies), "guide": Passes(guide.model)}
    for aligned in sides.values():  # warm-up: first passes allocate; not counted
        aligned.generate(request_for("What is 2 + 3?"))
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        results = [sides["nudging"].generate(request_for(q)) for q in questions]
        profiler.disable()
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("tottime").print_stats(15)
        print(listing.getvalue())
        tokens = sum(r.tokens for r in results)
        return {"base": pair.base, "guide": pair.guide, "tokens": tokens,
                "tokens_per_second": round(tokens / sum(r.seconds for r in results), 3)}

    results: dict[str, list] = {side: [] for side in sides}
    passes = {side: dict.fromkeys(counters, 0) for side in sides}
    for question in questions:
        for side, aligned in sides.items():
            before = {name: counter.count for name, counter in counters.items()}
            results[side].append(aligned.generate(request_for(question)))
            for name, counter in counters.items():
                passes[side][name] += counter.count - before[name]
    report: dict = {"base": pair.base, "guide": pair.guide}
    for side, side_results in results.items():
        tokens = sum(r.tokens for r in side_results)
        seconds = sum(r.seconds for r in side_results)
        entry = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 3),
                 "base_forwards_per_token": round(passes[side]["base"] / tokens, 3)}
        if side.startswith("nudging"):
            entry["guide_forwards_per_token"] = round(passes[side]["guide"] / tokens, 3)
            entry["guide_token_fraction"] = round(sum(r.guide_tokens for r in side_results) / tokens, 3)
            entry["rounds_per_answer"] = round(sum(len(r.rounds) for r in side_results) / len(side_results), 1)
        report[side] = entry
    plain = max(report["base_only"]["tokens_per_second"], report["base_only_stock"]["tokens_per_second"])
    report["ratio"] = round(report["nudging"]["tokens_per_second"] / plain, 3)
    report["ratio_adaptive"] = round(report["nudging_adaptive"]["tokens_per_second"] / plain, 3)
    report["adaptive_same_texts"] = [a.text == b.text for a, b in zip(results["nudging_adaptive"], results["nudging"])]
    report["ratio_to_stock_base"] = round(
        report["nudging"]["tokens_per_second"] / report["base_only_stock"]["tokens_per_second"], 3)
    report["ratio_to_drafted_base"] = round(
        report["nudging"]["tokens_per_second"] / report["base_only_drafted"]["tokens_per_second"], 3)
    for aligned in sides.values():
        aligned.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_options(parser, PAIRS)
    parser.add_argument("--profile", action="store_true", help="profile nudging instead of timing both sides")
    args = parser.parse_args()
    chosen = chosen_pairs(parser, args, PAIRS)
    run_pairs(chosen, functools.partial(run_pair, profile=args.profile))


if __name__ == "__main__":
    main()
