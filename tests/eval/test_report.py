"""``towline report``: the side-by-side table, the HTML page and the gamma plot, from real runs of
tiny in-process models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from towline.eval.report import build_report, highlighted
from towline.eval.runner import EvalConfig, evaluate


@pytest.fixture(scope="module")
def sweep(tiny_base, tiny_guide, tmp_path_factory):
    """Two runs: base-only, guide-only and nudging at gamma 0.4; nudging alone at gamma 0.9."""
    root = tmp_path_factory.mktemp("runs")
    both = {"base": tiny_base, "guide": tiny_guide, "max_tokens": 8}
    evaluate(EvalConfig(datasets=("gsm8k", "sports"), num_samples=2, methods={
        "nudging": {**both, "gamma": 0.4}, "base-only": {"base": tiny_base, "max_tokens": 8},
        "guide-only": {"guide": tiny_guide, "max_tokens": 8}}), root / "x")
    evaluate(EvalConfig(datasets=("gsm8k", "sports"), num_samples=2, methods={"nudging": {**both, "gamma": 0.9}}),
             root / "y")
    return root


def test_the_table_follows_the_papers_layout(sweep, tmp_path):
    report = build_report([sweep / "y", sweep / "x"], tmp_path)
    assert report.summary.header() == ["base-only", "guide-only", "nudging gamma=0.4", "nudging gamma=0.9"]
    assert [name for name, _ in report.summary.rows()] == ["gsm8k", "sports", "average"]
    share = dict(report.summary.footer())["guide share"]
    assert share[:2] == ["", ""] and all(cell.endswith("%") for cell in share[2:])


def test_the_page_shows_every_answer_with_the_guides_words(sweep, tmp_path):
    report = build_report([sweep / "x", sweep / "y"], tmp_path)
    page = report.html.read_text()
    records = [json.loads(line) for run in ("x", "y") for line in (sweep / run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 4
    assert page.count("<details>") == 4  # one per item, every column inside
    assert page.count('class="answer') == 16
    assert '<mark class="guide">' in page
    assert "✓" in page or "✗" in page
    assert "<script" not in page and "http" not in page.split("<body>")[1].split("Runs:")[0]


def test_a_gamma_sweep_is_plotted(sweep, tmp_path):
    report = build_report([sweep / "x", sweep / "y"], tmp_path)
    assert report.plot == tmp_path / "gamma.png"
    assert report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = build_report([sweep / "x"], tmp_path / "single")
    assert single.plot is None and not (tmp_path / "single" / "gamma.png").exists()


def test_report_command(sweep, tmp_path):
    done = subprocess.run([sys.executable, "-m", "towline.cli", "report", str(sweep / "x"), str(sweep / "y"),
                           "--out", str(tmp_path)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nudging gamma=0.4" in done.stdout and "average" in done.stdout
    assert (tmp_path / "report.html").exists() and (tmp_path / "gamma.png").exists()
    missing = subprocess.run([sys.executable, "-m", "towline.cli", "report", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "not a towline eval run folder" in missing.stderr


def test_guide_words_are_marked_only_up_to_the_final_text():
    result = {"text": "Step one. Step", "rounds": [{"nudging_words": "Step", "base_text": " one."},
                                                   {"nudging_words": " Step", "base_text": " one. Step one."}]}
    assert highlighted(result) == '<mark class="guide">Step</mark> one.<mark class="guide"> Step</mark>'
    assert highlighted({"text": "a < b"}) == "a &lt; b"


def test_recheck_scores_stored_answers_with_todays_checkers(sweep, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(sweep / "x", run)
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    stale = [{**r, "correct": not r["correct"], "rule": {"correct": not r["correct"], "extracted": "?"}}
             for r in records]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    fresh = build_report([sweep / "x"], tmp_path / "fresh").summary
    assert build_report([run], tmp_path / "stale").summary.average != fresh.average
    rechecked = build_report([run], tmp_path / "rechecked", recheck=True).summary
    assert rechecked.average == fresh.average and rechecked.cells == fresh.cells


def test_runs_of_one_configuration_over_different_tasks_join_into_one_column(tiny_base, tmp_path):
    methods = {"base-only": {"base": tiny_base, "max_tokens": 4}}
    evaluate(EvalConfig(datasets=("gsm8k",), num_samples=1, methods=methods), tmp_path / "first-half")
    evaluate(EvalConfig(datasets=("sports",), num_samples=1, methods=methods), tmp_path / "second-half")
    joined = build_report([tmp_path / "first-half", tmp_path / "second-half"], tmp_path / "report")
    assert joined.summary.header() == ["base-only"]
    assert [name for name, _ in joined.summary.rows()] == ["gsm8k", "sports", "average"]
    assert all(cells[0] != "—" for _, cells in joined.summary.rows())
    # Runs over the same items stay apart, told by their folders.
    shutil.copytree(tmp_path / "first-half", tmp_path / "again")
    apart = build_report([tmp_path / "first-half", tmp_path / "again"], tmp_path / "report2")
    assert sorted(apart.summary.header()) == ["base-only (again)", "base-only (first-half)"]
