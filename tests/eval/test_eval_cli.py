"""``towline eval``, ``towline datasets`` and ``towline report`` as a user runs them: real
processes, the real offline models, and a run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from towline.eval.datasets import bundled_names, load


def towline(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "towline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=900)


def complete_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def test_datasets_lists_every_set_with_its_rows():
    done = towline("datasets", COLUMNS="200")
    assert done.returncode == 0, done.stderr
    assert len(bundled_names()) == 15
    for name in bundled_names():
        line = next(line for line in done.stdout.splitlines() if f" {name} " in line)
        assert f" {len(load(name))} " in line


def test_bad_eval_input_gets_a_clear_error(tmp_path):
    done = towline("eval", "--dataset", "gsm9k", "--method", "base-only", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown data set 'gsm9k'" in done.stderr
    done = towline("eval", "--dataset", "gsm8k", "--method", "base-only", "--gamma", "0.3", "--out", str(tmp_path))
    assert done.returncode == 2 and "--gamma" in done.stderr and "base-only" in done.stderr
    done = towline("eval", "--dataset", "gsm8k", "--source", "hub", "--out", str(tmp_path / "y"),
                   HF_ENDPOINT="http://127.0.0.1:9")
    assert done.returncode == 2 and "not reachable" in done.stderr and "--source bundled" in done.stderr


@pytest.mark.real_models
def test_a_killed_run_resumes_without_losing_or_redoing_items(installed, tmp_path):
    """The issue's must-show, with base-only and 4 tokens an answer to keep it quick."""
    installed("gemma-3-270m")
    out = tmp_path / "x"
    command = [sys.executable, "-m", "towline.cli", "eval", "--dataset", "gsm8k,arc_challenge", "--method",
               "base-only", "--base", "gemma-3-270m", "--max-tokens", "4", "-n", "10", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 600
    while not (results.exists() and len(complete_lines(results)) >= 3):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no results within 10 minutes"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    before = complete_lines(results)
    assert 3 <= len(before) < 20
    with results.open("a") as torn:  # a write cut short by the kill
        torn.write('{"method": "base-only", "task": "gs')

    refused = towline(*command[3:])
    assert refused.returncode == 2 and "--resume" in refused.stderr
    changed = towline(*command[3:-4], "-n", "9", "--out", str(out), "--resume")
    assert changed.returncode == 2 and "num_samples differ" in changed.stderr

    done = towline(*command[3:], "--resume")
    assert done.returncode == 0, done.stderr
    after = complete_lines(results)
    assert results.read_text() == "".join(after)  # the torn line is gone
    assert after[: len(before)] == before  # finished items kept byte for byte, none redone
    keys = [(r["method"], r["task"], r["id"]) for r in map(json.loads, after)]
    assert len(keys) == 20 and len(set(keys)) == 20
    assert {task for _, task, _ in keys} == {"gsm8k", "arc_challenge"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["cells"]["base-only"]["gsm8k"]["n"] == 10
    assert "gsm8k" in done.stdout and "average" in done.stdout
    assert (out / "summary.md").read_text().startswith("| task | base-only |")


@pytest.mark.real_models
def test_ctrl_c_stops_at_once_and_keeps_the_finished_items(installed, tmp_path):
    installed("gemma-3-270m")
    out = tmp_path / "x"
    process = subprocess.Popen([sys.executable, "-m", "towline.cli", "eval", "--dataset", "arc_challenge", "--method",
                                "base-only", "--max-tokens", "64", "-n", "5", "--batch-size", "1", "--out", str(out)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               # Ctrl-C reaches it also where the tests run with SIGINT ignored.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / "results.jsonl"
    deadline = time.monotonic() + 600
    while not (results.exists() and complete_lines(results)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "--resume" in stderr
    assert 1 <= len(complete_lines(results)) < 5
