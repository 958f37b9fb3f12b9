"""The LLM judge: reading loose replies, and a real llama.cpp server as the judge."""

from __future__ import annotations

import json

import pytest

from towline.eval.judge import ASPECTS, SAFETY_ASPECTS, Judge, read_scores, read_verdict
from towline.eval.runner import EvalConfig, evaluate

# Replies of SmolLM2-135M-Instruct (llama.cpp server, JSON mode) to the paper's prompts.
SMOL_CORRECTNESS = '{\n    "score": 1,\n    "reason": "The model\'s answer is correct and the gold answer is incorrect."\n}'
SMOL_ASPECTS = ('{\n    "Helpfulness": 5,\n    "Clarity": 4.2,\n    "Factuality": 3.1,\n    "Depth": 0.8,\n'
                '    "Engagement": 0.7\n}')
SMOL_SAFETY = '{\n    "safety": {\n        "reason": "[your rationale]",\n        "score": [1, 2, 3, 4, 5]\n    }\n}'
# Replies in the shapes larger judges write.
GPT_STYLE = '{"reason": "The final answer 72 equals the gold answer.", "correct": "1"}'
FENCED = "Sure!\n```\n{\n    'reason': \"The answer is 60, not 72\",\n    \"correct\": \"0\"\n}\n```"
TRUNCATED = '{\n    "reason": "The model computes 48 + 24 = 72, and the gold answer is 72, so'
JUSTEVAL_STYLE = json.dumps({a: {"reason": "ok", "score": str(s)} for a, s in zip(ASPECTS, [4, 5, 3, 2, 4])})


def test_verdicts_are_read_from_loose_json():
    assert read_verdict(GPT_STYLE) is True
    assert read_verdict(FENCED) is False
    assert read_verdict('"correct": 1') is True
    assert read_verdict('{"correct": true}') is True


def test_unreadable_verdicts_are_none_never_guessed():
    assert read_verdict(SMOL_CORRECTNESS) is None  # no "correct" field at all
    assert read_verdict(TRUNCATED) is None
    assert read_verdict('{"reason": "x", "correct": "[1 if correct, 0 if incorrect]"}') is None
    assert read_verdict("") is None


def test_aspect_scores_are_read_where_they_are_one_number_in_range():
    assert read_scores(JUSTEVAL_STYLE, ASPECTS) == {"helpfulness": 4, "clarity": 5, "factuality": 3, "depth": 2,
                                                    "engagement": 4}
    assert read_scores(SMOL_ASPECTS, ASPECTS) == {"helpfulness": 5, "clarity": 4.2, "factuality": 3.1,
                                                  "depth": None, "engagement": None}
    assert read_scores(SMOL_SAFETY, SAFETY_ASPECTS) == {"safety": None}  # the placeholder list echoed back
    assert read_scores("helpfulness: 4, clarity: 3\ndepth: [score from 1 to 5]", ASPECTS)["depth"] is None
    assert read_scores("not json at all", SAFETY_ASPECTS) == {"safety": None}


def test_a_judge_spec_must_name_an_endpoint():
    with pytest.raises(ValueError, match="openai:MODEL@URL"):
        Judge("gpt-4o-mini")


@pytest.mark.real_models
def test_a_llama_cpp_server_judges_correctness_and_aspects(smol_url):
    judge = Judge(f"openai:smollm2-135m-instruct@{smol_url}", max_tokens=64)
    question = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in all?"
    verdict = judge.correctness(question, "She sold 48 + 24 = 72 clips.", "72")
    assert verdict.kind == "correct" and verdict.raw.strip()
    assert verdict.correct == read_verdict(verdict.raw) and verdict.parsed == (verdict.correct is not None)
    scores = judge.aspects("Give me one tip for sleeping better.", "Keep the bedroom cool and dark.")
    assert set(scores.scores) == set(ASPECTS) and scores.scores == read_scores(scores.raw, ASPECTS)
    safety = judge.aspects("How do I break into my neighbour's house?", "I can't help with that.", safety=True)
    assert set(safety.scores) == {"safety"}


@pytest.mark.real_models
def test_a_cut_off_reply_is_recorded_as_unparseable(smol_url):
    judge = Judge(f"openai:smollm2-135m-instruct@{smol_url}", max_tokens=3)
    verdict = judge.correctness("What is 2 + 2?", "4", "4")
    assert verdict.correct is None and not verdict.parsed and verdict.to_dict()["parsed"] is False
    scores = judge.aspects("Say hi.", "Hi!")
    assert not scores.parsed and scores.score is None


@pytest.mark.real_models
def test_a_run_with_a_judge_reports_rule_judge_agreement(tiny_base, smol_url, tmp_path):
    run = EvalConfig(datasets=("multiarith",), methods={"base-only": {"base": tiny_base, "max_tokens": 4}},
                     num_samples=2, judge=f"openai:smollm2-135m-instruct@{smol_url}")
    summary = evaluate(run, tmp_path / "run", workers=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["judge"]["kind"] == "correct" and record["judge"]["raw"]
        assert record["correct"] == record["rule"]["correct"]  # the rule decides where there is one
    cell = summary.cells["base-only"]["multiarith"]
    pairs = [r for r in records if r["judge"]["correct"] is not None]
    assert cell["judge_unparsed"] == 2 - len(pairs)
    if pairs:
        assert cell["agreement"] == sum(r["rule"]["correct"] == r["judge"]["correct"] for r in pairs) / len(pairs)
    else:
        assert cell["agreement"] is None
