"""Steering gemma-3-270m towards positive movie reviews with weak-to-strong search.

    python bench/imdb_sentiment.py [--prefixes 50] [--methods base-only,bon-4,bon-16,cbs-2-2-30]

The base model continues the opening words of IMDB reviews (bench/data/imdb.jsonl) on the
plain prompt ``Write a movie review for IMDB.\\n{opening}``, sampling at temperature 0.7 with
top-k 50, up to ``--max-tokens`` tokens. Best-of-N and chunk-level beam search pick among its
samples with an implicit value built from the one small chat model available offline:
smollm2-135m-instruct told that the reviewer loved the movie (the "tuned" side) against the
same model without that instruction (the "untuned" side), each on its own ChatML prompt
whose assistant turn starts with the opening. No sentiment-tuned pair of small models
exists offline; this instruction-contrast pair stands in for one.

The gold reward is VADER's compound sentiment (-1..1) of the whole review (opening +
continuation), which none of the models sees. Each (review, method) result is appended to
``--out`` as it is made, so a killed run resumes where it stopped. Prints a Markdown table,
then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

import towline
from towline.methods.scorers import ImplicitValue
from towline.models import load_model
from towline.models.base import Sampling
from towline.prompts import PromptRequest

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "imdb.jsonl"
QUESTION = "Write a movie review for IMDB."
INSTRUCTION = " You loved the movie."
CHATML_USER_INSTRUCTION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'user' %}" + INSTRUCTION + "{% endif %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
"""ChatML with the instruction added to the user's message: the tuned side's template."""
METHODS = {
    "base-only": ("base-only", {}),
    "bon-4": ("bon", {"n": 4}),
    "bon-16": ("bon", {"n": 16}),
    "cbs-2-2-30": ("cbs", {"w": 2, "k": 2, "l": 30}),
    "cbs-4-4-30": ("cbs", {"w": 4, "k": 4, "l": 30}),
}
SEED = 609


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=50, help="How many review openings (at most 50).")
    parser.add_argument("--methods", default="base-only,bon-4,bon-16,cbs-2-2-30",
                        help=f"Comma-separated, from: {', '.join(METHODS)}.")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "imdb_sentiment.jsonl")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][: args.prefixes]
    settings = {"max_tokens": args.max_tokens, "question": QUESTION, "instruction": INSTRUCTION.strip()}
    done = _load(args.out, settings)
    base = load_model("gemma-3-270m")
    small = load_model("smollm2-135m-instruct")
    scorer = ImplicitValue(small, small, tuned_template=CHATML_USER_INSTRUCTION, untuned_template="chatml",
                           spec="implicit:smollm2-135m-instruct,smollm2-135m-instruct")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as out:
        for index, row in enumerate(rows):
            request = PromptRequest(question=QUESTION, answer_start=row["question"])
            sampling = Sampling(temperature=0.7, top_k=50, seed=SEED + index)
            for name in methods:
                if (row["id"], name) in done:
                    continue
                method, options = METHODS[name]
                extra = {} if method == "base-only" else {"scorer": scorer}
                with towline.compose(method=method, base=base, base_sampling=sampling,
                                     max_tokens=args.max_tokens, **options, **extra) as aligned:
                    result = aligned.generate(request)
                record = {
                    **settings, "id": row["id"], "method": name, "text": result.text,
                    "gold": vader.polarity_scores(row["question"] + result.text)["compound"],
                    "score": getattr(result, "score", None), "tokens": result.tokens,
                    "candidate_tokens": getattr(result, "candidate_tokens", result.tokens),
                    "model_calls": result.model_calls, "seconds": result.seconds,
                    "stop_reason": result.stop_reason,
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                done[(row["id"], name)] = record
    ids = [row["id"] for row in rows]
    summary = {"prefixes": len(ids), **settings, "base": "gemma-3-270m", "sampling": "temperature 0.7, top-k 50",
               "scorer": "implicit: smollm2-135m-instruct told 'You loved the movie.' vs not (ChatML)",
               "gold": "VADER compound of opening + continuation", "methods": {}}
    for name in methods:
        records = [done[(i, name)] for i in ids if (i, name) in done]
        summary["methods"][name] = _summarize(records)
    print(_table(summary))
    print(json.dumps(summary))


def _load(path: Path, settings: dict) -> dict:
    """Results already made with the same settings, by (review id, method)."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if all(record.get(key) == value for key, value in settings.items()):
                done[(record["id"], record["method"])] = record
    return done


def _summarize(records: list[dict]) -> dict:
    if not records:
        return {"n": 0}
    gold = [r["gold"] for r in records]
    n = len(records)
    return {
        "n": n,
        "gold_mean": round(statistics.mean(gold), 4),
        "gold_sem": round(statistics.stdev(gold) / math.sqrt(n), 4) if n > 1 else None,
        "positive_share": round(sum(g > 0.05 for g in gold) / n, 3),
        "model_calls": round(statistics.mean(sum(r["model_calls"].values()) for r in records), 2),
        "model_calls_by_role": {role: round(statistics.mean(r["model_calls"].get(role, 0) for r in records), 2)
                                for role in sorted({k for r in records for k in r["model_calls"]})},
        "candidate_tokens": round(statistics.mean(r["candidate_tokens"] for r in records), 1),
        "seconds": round(statistics.mean(r["seconds"] for r in records), 2),
    }


def _table(summary: dict) -> str:
    lines = ["| method | prefixes | mean VADER compound (± s.e.) | positive share | model calls / prefix "
             "| base tokens sampled / prefix | seconds / prefix |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["methods"].items():
        if not s["n"]:
            continue
        sem = f" ± {s['gold_sem']:.3f}" if s["gold_sem"] is not None else ""
        calls = ", ".join(f"{role} {count:g}" for role, count in s["model_calls_by_role"].items())
        lines.append(f"| {name} | {s['n']} | {s['gold_mean']:.3f}{sem} | {s['positive_share']:.0%} | "
                     f"{s['model_calls']:g} ({calls}) | {s['candidate_tokens']:g} | {s['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
