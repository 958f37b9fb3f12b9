"""The evaluation runner on tiny in-process models: results, resume, refusals, concurrency."""

from __future__ import annotations

import json

import pytest

from towline.eval.runner import EvalConfig, RunError, evaluate, plan, read_results, record_key
from towline.eval.summary import summarize


def config(tiny_base, tiny_guide, **changes) -> EvalConfig:
    methods = {
        "base-only": {"base": tiny_base, "max_tokens": 6},
        "guide-only": {"guide": tiny_guide, "max_tokens": 6},
        "nudging": {"base": tiny_base, "guide": tiny_guide, "max_tokens": 6, "gamma": 0.4},
    }
    return EvalConfig(**{"datasets": ("gsm8k", "arc_challenge"), "methods": methods, "num_samples": 2, **changes})


def lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_a_run_writes_one_line_per_item_and_a_summary(tiny_base, tiny_guide, tmp_path):
    summary = evaluate(config(tiny_base, tiny_guide), tmp_path / "run")
    records = lines(tmp_path / "run")
    assert len(records) == 2 * 2 * 3
    assert len({(r["method"], r["task"], r["id"]) for r in records}) == 12
    first = records[0]
    assert first["result"]["method"] == first["method"] and first["rule"]["correct"] in (True, False)
    assert first["correct"] == first["rule"]["correct"]
    assert [r["task"] for r in records[:6]] == ["gsm8k"] * 3 + ["arc_challenge"] * 3  # interleaved tasks
    assert summary.complete and summary.methods == ["base-only", "guide-only", "nudging"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["cells"]["nudging"]["gsm8k"]["n"] == 2
    assert saved["cells"]["nudging"]["gsm8k"]["guide_share"] is not None
    assert saved["cells"]["base-only"]["gsm8k"]["guide_share"] is None
    assert saved["cells"]["nudging"]["arc_challenge"]["model_calls"]["guide"] >= 2
    assert "| average |" in (tmp_path / "run" / "summary.md").read_text()
    config_saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_saved["methods"]["nudging"]["base"] == "tiny-base"
    assert config_saved["sample_seed"] == 609


def test_batches_give_every_item_once_and_nudging_the_same_answers(tiny_base, tiny_guide, tmp_path):
    evaluate(config(tiny_base, tiny_guide), tmp_path / "one")
    one = {record_key(r): r for r in lines(tmp_path / "one")}
    summary = evaluate(config(tiny_base, tiny_guide, num_samples=3), tmp_path / "batched", batch_size=2)
    batched = {record_key(r): r for r in lines(tmp_path / "batched")}
    assert len(batched) == 3 * 2 * 3 and summary.complete
    for key, record in one.items():
        if key[0] == "nudging":  # answered together, each as alone
            assert batched[key]["result"]["text"] == record["result"]["text"]


def test_resume_skips_finished_items_and_repairs_a_torn_line(tiny_base, tiny_guide, tmp_path):
    folder = tmp_path / "run"
    evaluate(config(tiny_base, tiny_guide), folder)
    kept = (folder / "results.jsonl").read_text().splitlines(keepends=True)[:5]
    torn = (folder / "results.jsonl").read_text().splitlines(keepends=True)[5][:40]
    (folder / "results.jsonl").write_text("".join(kept) + torn)
    summary = evaluate(config(tiny_base, tiny_guide), folder, resume=True)
    records = lines(folder)
    assert len(records) == 12 and summary.complete
    assert [json.dumps(r) + "\n" for r in records[:5]] == [json.dumps(json.loads(k)) + "\n" for k in kept]
    assert len({(r["method"], r["task"], r["id"]) for r in records}) == 12
    again = evaluate(config(tiny_base, tiny_guide), folder, resume=True)  # nothing left: nothing run
    assert len(lines(folder)) == 12 and again.complete


def test_an_existing_run_needs_resume_and_the_same_config(tiny_base, tiny_guide, tmp_path):
    folder = tmp_path / "run"
    evaluate(config(tiny_base, tiny_guide, num_samples=1), folder)
    with pytest.raises(RunError, match="--resume"):
        evaluate(config(tiny_base, tiny_guide, num_samples=1), folder)
    with pytest.raises(RunError, match="num_samples differ"):
        evaluate(config(tiny_base, tiny_guide, num_samples=2), folder, resume=True)
    changed = config(tiny_base, tiny_guide, num_samples=1)
    changed.methods["nudging"]["gamma"] = 0.3
    with pytest.raises(RunError, match="methods differ"):
        evaluate(changed, folder, resume=True)


def test_workers_share_local_models_safely(tiny_base, tiny_guide, tmp_path):
    """Local models serve one item at a time, so any number of workers gives the same answers."""
    evaluate(config(tiny_base, tiny_guide), tmp_path / "one", workers=1)
    evaluate(config(tiny_base, tiny_guide), tmp_path / "four", workers=4)
    one = {(r["method"], r["task"], r["id"]): r["result"]["text"] for r in lines(tmp_path / "one")}
    four = {(r["method"], r["task"], r["id"]): r["result"]["text"] for r in lines(tmp_path / "four")}
    assert one == four


def test_prompt_overrides_reach_the_models(tiny_base, tmp_path):
    run = EvalConfig(datasets=("mmlu",), methods={"base-only": {"base": tiny_base, "max_tokens": 2}}, num_samples=1,
                     prompt={"system": "Be brief.", "question_prefix": "Q: "})
    evaluate(run, tmp_path / "run")
    record = lines(tmp_path / "run")[0]
    prompt = record["result"]["prompts"]["base"]
    assert prompt.startswith("Be brief.\nSubject: ") and "\nQ: " in prompt


def test_an_item_too_long_for_the_model_is_recorded_as_skipped(tiny_base, tmp_path):
    run = EvalConfig(datasets=("gsm8k",), methods={"base-only": {"base": tiny_base, "max_tokens": 2000}},
                     num_samples=1)
    summary = evaluate(run, tmp_path / "run")
    record = lines(tmp_path / "run")[0]
    assert record["error"] and "context" in record["error"] and record["correct"] is False
    assert summary.cells["base-only"]["gsm8k"]["errors"] == 1


def test_custom_data_file(tiny_base, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 2 + 2?", "answer": "4"}) + "\n"
                    + json.dumps({"id": "b", "question": "What is 3 + 3?", "answer": "6"}) + "\n")
    run = EvalConfig(datasets=("gsm8k",), methods={"base-only": {"base": tiny_base, "max_tokens": 2}},
                     num_samples=None, data=str(data))
    evaluate(run, tmp_path / "run")
    assert [r["id"] for r in lines(tmp_path / "run")] == ["a", "b"]
    data.write_text(data.read_text().replace("3 + 3", "3 + 4"))
    with pytest.raises(RunError, match="data_sha256 differ"):
        evaluate(run, tmp_path / "run", resume=True)


def test_plan_draws_the_papers_sample():
    run = EvalConfig(datasets=("last_letter_concat",), methods={"base-only": {}}, num_samples=3)
    assert [job.row["id"] for job in plan(run)] == ["last_letter_concat-424", "last_letter_concat-388",
                                                     "last_letter_concat-107"]


def test_read_results_ignores_a_torn_last_line_without_repairing(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"method": "m", "task": "t", "id": "1"}) + "\n" + '{"method": "m", "ta')
    assert len(read_results(path)) == 1
    assert path.read_text().endswith('"ta')
    assert len(read_results(path, repair=True)) == 1 and path.read_text().endswith("\n")


def test_summary_reports_rule_judge_agreement():
    def record(item, rule, judge):
        return {"method": "m", "task": "gsm8k", "id": item, "correct": rule, "score": None,
                "rule": {"correct": rule}, "judge": {"kind": "correct", "correct": judge, "parsed": judge is not None},
                "result": {"tokens": 1, "seconds": 0.1, "model_calls": {"base": 1}, "stop_reason": "end"}}
    summary = summarize({"methods": {"m": {}}}, [record("1", True, True), record("2", False, True),
                                                 record("3", False, False), record("4", True, None)])
    cell = summary.cells["m"]["gsm8k"]
    assert cell["agreement"] == pytest.approx(2 / 3) and cell["judge_unparsed"] == 1
    assert cell["accuracy"] == 0.5 and cell["judge_accuracy"] == pytest.approx(2 / 3)
    assert ("rule = judge", ["67%"]) in summary.footer()


@pytest.mark.real_models
def test_a_server_model_takes_several_items_at_once(gemma_url, tmp_path):
    spec = f"openai:gemma-3-270m@{gemma_url}"
    run = EvalConfig(datasets=("arc_challenge",), methods={"base-only": {"base": spec, "max_tokens": 4}}, num_samples=4)
    evaluate(run, tmp_path / "one", workers=1)
    summary = evaluate(run, tmp_path / "three", workers=3)
    one = {r["id"]: r["result"]["text"] for r in lines(tmp_path / "one")}
    three = {r["id"]: r["result"]["text"] for r in lines(tmp_path / "three")}
    assert one == three and len(three) == 4  # greedy answers, whatever the concurrency
    assert summary.cells["base-only"]["arc_challenge"]["model_calls"] == {"base": 4}
