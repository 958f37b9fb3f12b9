"""Nudging speed on the bundled models, local weights, CPU. Prints one JSON object.

    python bench/nudging.py [--questions 3] [--max-tokens 128]

Runs the first GSM8K questions (the copy bundled with towline's evaluation data) on the local
backend's fast path (prefix-KV reuse and lookup drafts, greedy) and on its plain path (every call
from scratch, a token a pass), and reports wall time, output tokens per second, guide share,
model calls, whether the texts are the same, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from towline.eval import datasets
from towline.methods.nudging import nudge
from towline.models.local import LocalModel
from towline.prompts import PromptRequest



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = datasets.load("gsm8k")[: args.questions]
    requests = [PromptRequest(question=r["question"], question_prefix="Question: ",
                              system="Answer the question by walking through the reasoning steps.") for r in rows]
    started = time.perf_counter()
    base, guide = LocalModel.load("gemma-3-270m"), LocalModel.load("smollm2-135m-instruct")
    report: dict = {"questions": len(requests), "max_tokens": args.max_tokens, "threads": args.threads,
                    "load_seconds": round(time.perf_counter() - started, 2)}
    for fast in (True, False):
        base.reuse_prefix = guide.reuse_prefix = base.draft = guide.draft = fast
        results = [nudge(base=base, guide=guide, request=r, max_tokens=args.max_tokens) for r in requests]
        seconds = sum(r.seconds for r in results)
        tokens = sum(r.tokens for r in results)
        report["fast_path" if fast else "plain_path"] = {
            "seconds_per_answer": round(seconds / len(results), 2),
            "output_tokens_per_second": round(tokens / seconds, 2),
            "mean_guide_token_fraction": round(sum(r.guide_token_fraction for r in results) / len(results), 3),
            "mean_model_calls": {k: sum(r.model_calls[k] for r in results) / len(results) for k in ("base", "guide")},
            "texts": [r.text for r in results],
        }
    report["same_texts"] = report["fast_path"].pop("texts") == report["plain_path"].pop("texts")
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
