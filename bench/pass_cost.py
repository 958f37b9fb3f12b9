"""What a forward pass over a few tokens costs, on stock and on packed linear layers. Prints one
JSON object last.

    python bench/pass_cost.py                          # the four bundled models, ~5 minutes
    python bench/pass_cost.py --models gemma-3-270m --widths 1,2,3,4

For each model, one thread: a pass over ``width`` new tokens on top of 200 cached ones (the
cache copied afresh for every pass), the median of several, in units of a one-token pass of the
same model on PyTorch's stock layers (``LocalModel.load(pack=False)``). ``packed`` is the
model as ``LocalModel.load`` sets it up (towline/models/packed.py). This is the cost that
decides whether a draft pays (docs/speed.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from towline.models.local import LocalModel

MODELS = ("gemma-3-270m", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
CACHED = 200
REPEATS = 9


def pass_seconds(model: torch.nn.Module, cache: object, width: int) -> float:
    """The median seconds of a pass over ``width`` tokens on a copy of ``cache``."""
    seconds = []
    for _ in range(REPEATS):
        fresh = copy.deepcopy(cache)
        ids = torch.randint(100, 1000, (1, width))
        started = time.perf_counter()
        model(input_ids=ids, past_key_values=fresh, use_cache=True)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registry names")
    parser.add_argument("--widths", default="1,2,3,4,8,17", help="comma-separated tokens per pass")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    torch.set_num_threads(1)  # the machines are small and shared
    torch.manual_seed(0)
    report: dict = {"threads": 1, "cached_tokens": CACHED, "repeats": REPEATS, "models": {}}
    with torch.inference_mode():
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            entry: dict = {}
            for side, pack in (("stock", False), ("packed", True)):
                model = LocalModel.load(name, pack=pack).model
                cache = model(input_ids=torch.randint(100, 1000, (1, CACHED)), use_cache=True).past_key_values
                pass_seconds(model, cache, 1)  # the first passes allocate
                entry[side] = {width: pass_seconds(model, cache, width) for width in widths}
                del model, cache
            one = entry["stock"][1]
            result = {"stock_one_token_ms": round(one * 1000, 1),
                      **{side: {w: round(s / one, 2) for w, s in costs.items()} for side, costs in entry.items()}}
            report["models"][name] = result
            print(json.dumps({name: result}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
