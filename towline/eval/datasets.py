"""The evaluation sets: bundled offline copies, the original Hugging Face datasets, or any
JSON Lines file of the same schema.

Every row is one JSON object ``{"id", "question", "answer", ...}``: multiple-choice rows list
their options as ``A. text`` lines inside ``question`` and keep ``answer_text``
(``"B. 3"``), ``choices`` and ``labels``; other original fields are kept as they are
(``data/SOURCES.md`` says where each file came from and how it was normalised).

>>> rows = load("last_letter_concat")
>>> len(rows), sorted(rows[0])
(150, ['answer', 'id', 'question'])
>>> [row["id"] for row in sample(rows, 3)]
['last_letter_concat-424', 'last_letter_concat-388', 'last_letter_concat-107']
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_SEED = 609
"""The nudging paper's seed for drawing its evaluation items."""
SOURCES = ("bundled", "hub")
HUB_PROBE_TIMEOUT_S = 5.0


class DatasetError(ValueError):
    """A data set cannot be read; the message says what to do."""


Row = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    """Where a data set lives on the Hugging Face Hub and how its rows become towline rows."""

    path: str
    name: str | None
    split: str
    convert: Callable[[Row, int], Row]
    note: str = ""


def sample(rows: list[Row], n: int | None, *, seed: int = SAMPLE_SEED) -> list[Row]:
    """``n`` rows drawn without replacement, exactly as the nudging paper's loaders draw them
    (``np.random.seed(609); np.random.choice(len(rows), n, replace=False)``, in the drawn
    order); all rows, in file order, when ``n`` is None or not smaller than the set.

    >>> [r["id"] for r in sample([{"id": i} for i in range(10)], 4)]
    [0, 9, 3, 4]
    >>> len(sample([{"id": 1}], 5))
    1
    """
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise DatasetError(f"the number of samples must be at least 1, got {n}")
    indexes = np.random.RandomState(seed).choice(len(rows), n, replace=False)
    return [rows[i] for i in indexes]


def bundled_names() -> list[str]:
    """Names of the bundled data sets (``towline/eval/data/NAME.jsonl.gz``)."""
    folder = resources.files("towline.eval") / "data"
    return sorted(p.name.removesuffix(".jsonl.gz") for p in folder.iterdir() if p.name.endswith(".jsonl.gz"))


def load(name: str, *, source: str = "bundled", data: str | Path | None = None) -> list[Row]:
    """All rows of data set ``name``: the bundled copy, the Hub original (``source="hub"``),
    or the JSON Lines file ``data`` (plain or gzip) when one is given."""
    if data is not None:
        return read_jsonl(Path(data))
    if source == "bundled":
        if name not in bundled_names():
            raise DatasetError(f"no bundled data set {name!r}: choose one of {', '.join(bundled_names())} "
                               "(or give your own JSONL file with --data)")
        with resources.as_file(resources.files("towline.eval") / "data" / f"{name}.jsonl.gz") as path:
            return read_jsonl(path)
    if source == "hub":
        return load_hub(name)
    raise DatasetError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON Lines file (gzip when the name ends in ``.gz``), each checked for the
    ``id``, ``question`` and ``answer`` fields, ids unique."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[Row] = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}, line {number}: not JSON ({error.msg})") from None
                missing = [k for k in ("id", "question", "answer") if not isinstance(row, dict) or k not in row]
                if missing:
                    raise DatasetError(f"{path}, line {number}: missing {', '.join(missing)}; every row needs "
                                       '{"id", "question", "answer"}')
                row["id"] = str(row["id"])
                rows.append(row)
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from None
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: id {duplicate!r} is used twice; ids must be unique")
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    return rows


# -- the original data sets on the Hugging Face Hub ---------------------------------------

def _choices(row: Row, question: str, labels: list[str], texts: list[str], answer: str) -> Row:
    lines = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    return {"question": f"{question}\n{lines}", "answer": answer,
            "answer_text": f"{answer}. {texts[labels.index(answer)]}", "choices": texts, "labels": labels}


def _gsm8k(row: Row, i: int) -> Row:
    solution = row["answer"]
    return {"id": f"gsm8k-test-{i}", "question": row["question"],
            "answer": solution.split("####")[-1].strip().replace(",", ""), "solution": solution}


def _svamp(row: Row, i: int) -> Row:
    answer = float(row["Answer"])
    return {"id": row["ID"], "question": row["question_concat"].strip(),
            "answer": str(int(answer)) if answer.is_integer() else str(answer),
            "equation": row["Equation"], "type": row["Type"]}


def _multiarith(row: Row, i: int) -> Row:
    return {"id": f"multiarith-{i}", "question": row["question"].strip(), "answer": str(row["final_ans"])}


def _mmlu(row: Row, i: int) -> Row:
    labels = [chr(ord("A") + k) for k in range(len(row["choices"]))]
    return {"id": f"mmlu-val-{row['subject']}-{i}", "subject": row["subject"],
            **_choices(row, row["question"], labels, row["choices"], labels[row["answer"]])}


def _labelled_choices(row: Row, i: int) -> Row:
    return {"id": row["id"], **_choices(row, row["question"], row["choices"]["label"], row["choices"]["text"],
                                        row["answerKey"])}


def _strategyqa(row: Row, i: int) -> Row:
    return {"id": row["qid"], "question": row["question"].strip(), "answer": "true" if row["answer"] else "false"}


def _bigbench(cut: str) -> Callable[[Row, int], Row]:
    def convert(row: Row, i: int) -> Row:
        return {"id": str(row["idx"]), "question": row["inputs"].split(cut)[0].strip(),
                "answer": row["targets"][0], "choices": row["multiple_choice_targets"]}
    return convert


def _date(row: Row, i: int) -> Row:
    return {"id": str(row["idx"]), "question": row["inputs"].split("Q:")[1].split("A:")[0].strip(),
            "answer": row["targets"][0], "choices": row["multiple_choice_targets"]}


def _coin_flip(row: Row, i: int) -> Row:
    return {"id": f"coin_flip-{i}", "question": row["inputs"].split("Q:")[1].strip(), "answer": row["targets"]}


def _last_letters(row: Row, i: int) -> Row:
    return {"id": f"last_letter_concat-{i}", "question": row["question"].strip(), "answer": row["answer"]}


def _justeval(row: Row, i: int) -> Row:
    return {"id": str(row["id"]), "question": row["input"].strip(), "answer": row["output_cand"]}


def _alpacaeval(row: Row, i: int) -> Row:
    return {"id": f"alpacaeval-{i}", "question": row["instruction"].strip(), "answer": row["output"],
            "dataset": row["dataset"]}


def _imdb(row: Row, i: int) -> Row:
    return {"id": f"imdb-{i}", "question": " ".join(row["text"].replace("<br />", " ").split()[:8]),
            "answer": "positive" if row["label"] == 1 else "negative"}


HUB: dict[str, HubSource] = {
    "gsm8k": HubSource("gsm8k", "main", "test", _gsm8k),
    "svamp": HubSource("ChilleD/SVAMP", None, "test", _svamp),
    "multiarith": HubSource("ChilleD/MultiArith", None, "test", _multiarith),
    "mmlu": HubSource("cais/mmlu", "all", "validation", _mmlu),
    "arc_challenge": HubSource("allenai/ai2_arc", "ARC-Challenge", "validation", _labelled_choices),
    "strategyqa": HubSource("ChilleD/StrategyQA", None, "test", _strategyqa),
    "csqa": HubSource("tau/commonsense_qa", None, "validation", _labelled_choices),
    "sports": HubSource("hails/bigbench", "sports_understanding_zero_shot", "default",
                        _bigbench("Plausible/implausible?")),
    "date": HubSource("hails/bigbench", "date_understanding_zero_shot", "default", _date),
    "coin_flip": HubSource("skrishna/coin_flip", None, "test", _coin_flip,
                           "the paper's 2-person set; the bundled copy is a substitute"),
    "last_letter_concat": HubSource("ChilleD/LastLetterConcat", None, "test", _last_letters),
    "justeval": HubSource("re-align/just-eval-instruct", "judgements_main", "gpt_3.5_turbo_0301", _justeval),
    "justeval_safe": HubSource("re-align/just-eval-instruct", "judgements_safety", "gpt_3.5_turbo_0301", _justeval),
    "alpacaeval": HubSource("tatsu-lab/alpaca_eval", "alpaca_eval", "eval", _alpacaeval),
    "imdb": HubSource("stanfordnlp/imdb", None, "test", _imdb,
                      "all 25,000 test reviews; the bundled copy draws 1,000 of them"),
}
"""The original of every data set, as the nudging paper loads it (``fywalter/nudging``,
``dataset_utils.py``), and how a Hub row becomes a towline row."""


def load_hub(name: str) -> list[Row]:
    """Rows of the original Hugging Face data set, converted to towline's schema.

    Checks first that the Hub answers, so an offline machine fails in seconds, not after the
    ``datasets`` library's retries."""
    if name not in HUB:
        raise DatasetError(f"{name!r} has no Hugging Face original: choose one of {', '.join(HUB)}")
    origin = HUB[name]
    _check_hub_reachable(origin.path)
    try:
        from datasets import load_dataset
    except ImportError:
        raise DatasetError("--source hub needs the datasets library: pip install 'towline[hub]'") from None
    try:
        table = load_dataset(origin.path, origin.name, split=origin.split)
    except Exception as error:  # the datasets library raises many kinds; all mean the same here
        raise DatasetError(f"cannot load {origin.path} ({origin.name or 'default'}/{origin.split}) from the "
                           f"Hugging Face Hub: {error}; use the bundled copy (--source bundled)") from None
    rows = [origin.convert(row, i) for i, row in enumerate(table)]
    for row in rows:
        row["id"] = str(row["id"])
    return rows


def _check_hub_reachable(path: str) -> None:
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise DatasetError("HF_HUB_OFFLINE is set, so the Hugging Face Hub is not used: "
                           "use the bundled copies (--source bundled)")
    try:
        httpx.head(f"{endpoint}/api/datasets/{path}", timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=True)
    except httpx.HTTPError as error:
        raise DatasetError(f"the Hugging Face Hub ({endpoint}) is not reachable ({type(error).__name__}: "
                           f"{error}); use the bundled copies (--source bundled, the default) or your "
                           "own file (--data FILE)") from None
