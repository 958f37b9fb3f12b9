"""What incremental scoring saves in chunk-level beam search. Prints one JSON object last.

    python bench/cbs_scoring.py

CBS with W, K, L = 2, 2, 30 on the bundled models: gemma-3-270m samples the candidates,
smollm2-135m-instruct scores them (implicit value: its chat prompt against its plain prompt),
local weights on the CPU, one thread. Every prompt is answered twice with the same seed, so
the base decodes the same candidates and the scorer judges the same texts:

- **cached**: each selection scores only what every candidate added since the last one, on
  top of its KV cache (reordered with the candidates);
- **full**: each selection reads every candidate's prompt and whole answer again in both
  scorer models (one batched pass per model), as the paper's implementation does.

``ratio`` is CBS seconds per prompt with cached scoring over those with full re-scoring; the
base's decoding, the same in both, is part of both. ``scoring_ratio`` is the ratio of the
time spent in the scorer alone. Seconds are CPU seconds of this process (``time.process_time``,
one thread): on an idle machine they equal wall seconds (also reported), and on a shared one
they are not inflated by other processes' load.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence

import torch

from towline.methods.base import Participant
from towline.methods.scorers import ImplicitValue, Scorer, Scoring
from towline.methods.search import ChunkBeamSearch
from towline.models.base import Sampling
from towline.models.local import LocalModel
from towline.prompts import PromptRequest

from common import request_for  # bench/, this script's folder

MAX_TOKENS = 192
SAMPLING = Sampling(temperature=0.7, top_k=50, seed=609)
QUESTIONS = [  # the first two GSM8K test questions
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
    "egg. How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]


class TimedScorer(Scorer):
    """Another scorer, with the seconds spent in its :meth:`Scoring.score` calls added up."""

    def __init__(self, inner: Scorer) -> None:
        self.inner, self.spec, self.seconds = inner, inner.spec, 0.0

    def start(self, request: PromptRequest, rows: int, *, room: int = 0) -> Scoring:
        inner, timer = self.inner.start(request, rows, room=room), self

        class _Timed(Scoring):
            calls, prompts, templates = inner.calls, inner.prompts, inner.templates

            def score(self, responses: Sequence[str]) -> list[float]:
                started = time.process_time()
                try:
                    return inner.score(responses)
                finally:
                    timer.seconds += time.process_time() - started

            def reorder(self, rows: Sequence[int]) -> None:
                inner.reorder(rows)

            def close(self) -> None:
                inner.close()

        return _Timed()


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = LocalModel.load("gemma-3-270m")
    small = LocalModel.load("smollm2-135m-instruct")
    report: dict = {"w": 2, "k": 2, "l": 30, "max_tokens": MAX_TOKENS, "prompts": len(QUESTIONS), "threads": 1,
                    "base": base.name, "scorer": f"implicit:{small.name},{small.name} (chat vs plain prompt)",
                    "load_seconds": round(time.perf_counter() - started, 2)}
    scorer = TimedScorer(ImplicitValue(small, small))
    search = ChunkBeamSearch(w=2, k=2, l=30, max_tokens=MAX_TOKENS, scorer=scorer)
    requests = [request_for(q) for q in QUESTIONS]
    # Warm up both paths (first calls allocate and load kernels), then alternate the modes per
    # prompt so that a change in the machine's load hits both alike.
    ChunkBeamSearch(w=2, k=2, l=4, max_tokens=8, scorer=scorer).run(requests[1], {"base": Participant(base, SAMPLING)})
    runs: dict[str, list] = {"cached": [], "full": []}
    for request in requests:
        for mode in ("cached", "full"):
            small.reuse_prefix = mode == "cached"
            scorer.seconds = 0.0
            cpu = time.process_time()
            result = search.run(request, {"base": Participant(base, SAMPLING)})
            runs[mode].append({"seconds": time.process_time() - cpu, "wall_seconds": result.seconds,
                               "scoring_seconds": scorer.seconds, "text": result.text,
                               "score": result.score, "tokens": result.tokens, "selections": result.selections})
    for mode, results in runs.items():
        report[mode] = {
            "seconds_per_prompt": round(sum(r["seconds"] for r in results) / len(results), 2),
            "wall_seconds_per_prompt": round(sum(r["wall_seconds"] for r in results) / len(results), 2),
            "scoring_seconds_per_prompt": round(sum(r["scoring_seconds"] for r in results) / len(results), 2),
            "base_seconds_per_prompt": round(sum(r["seconds"] - r["scoring_seconds"] for r in results) / len(results), 2),
            "selections_per_prompt": sum(r["selections"] for r in results) / len(results),
            "tokens_per_prompt": sum(r["tokens"] for r in results) / len(results),
        }
    report["same_texts"] = [r["text"] for r in runs["cached"]] == [r["text"] for r in runs["full"]]
    report["max_score_difference"] = max(abs(a["score"] - b["score"]) for a, b in zip(runs["cached"], runs["full"]))
    report["scoring_ratio"] = round(report["cached"]["scoring_seconds_per_prompt"]
                                    / report["full"]["scoring_seconds_per_prompt"], 3)
    report["ratio"] = round(report["cached"]["seconds_per_prompt"] / report["full"]["seconds_per_prompt"], 3)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["total_cpu_seconds"] = round(time.process_time(), 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
