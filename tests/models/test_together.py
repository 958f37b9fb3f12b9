"""Tests for towline.models.together: answers taking turns, their calls merged by key."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from towline.models.together import answers_together, in_together, merged_call, run_together


class Recorder:
    """A compute function per key that records each batch it is given."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[tuple[int, int]]]] = []

    def compute(self, key: str):
        def run(items: list[tuple[int, int]]) -> list[tuple[str, int]]:
            self.batches.append((key, list(items)))
            return [(key, value * 2) for _, value in items]
        return run


@settings(max_examples=40, deadline=None)
@given(programs=st.lists(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 99)), max_size=6),
                         min_size=1, max_size=5))
def test_every_call_gets_its_own_result_in_batches_of_one_key(programs):
    """Whatever each answer calls, it gets what computing its calls one by one gives; a batch
    holds one key's calls, at most one per answer, in the answers' order."""
    recorder = Recorder()
    running = threading.Semaphore(1)

    def answer(index: int, program: list[tuple[str, int]]):
        def run() -> list[tuple[str, int]]:
            assert running.acquire(blocking=False), "two answers ran at once"
            try:
                out = []
                for key, value in program:
                    running.release()  # parked in merged_call: another answer may run
                    out.append(merged_call(key, (index, value), recorder.compute(key)))
                    assert running.acquire(blocking=False), "two answers ran at once"
                return out
            finally:
                running.release()
        return run

    results = run_together([answer(i, p) for i, p in enumerate(programs)])
    assert results == [[(key, 2 * value) for key, value in program] for program in programs]
    for key, items in recorder.batches:
        answers = [index for index, _ in items]
        assert answers == sorted(set(answers))
        assert all(programs[index] for index in answers)
    assert sum(len(items) for _, items in recorder.batches) == sum(len(p) for p in programs)


def test_waiting_calls_of_one_key_run_as_one_batch():
    recorder = Recorder()
    results = run_together([lambda i=i: merged_call("model", (i, i), recorder.compute("model")) for i in range(4)])
    assert results == [("model", 2 * i) for i in range(4)]
    assert recorder.batches == [("model", [(0, 0), (1, 1), (2, 2), (3, 3)])]


def test_the_key_most_answers_wait_on_runs_first():
    recorder = Recorder()
    tasks = [lambda: merged_call("guide", (0, 1), recorder.compute("guide")),
             lambda: merged_call("base", (1, 1), recorder.compute("base")),
             lambda: merged_call("base", (2, 1), recorder.compute("base"))]
    run_together(tasks)
    assert [key for key, _ in recorder.batches] == ["base", "guide"]


def test_outside_run_together_a_call_is_computed_alone():
    recorder = Recorder()
    assert not in_together()
    assert merged_call("model", (0, 5), recorder.compute("model")) == ("model", 10)
    assert recorder.batches == [("model", [(0, 5)])]
    assert run_together([in_together, in_together]) == [True, True]
    assert run_together([]) == []


def test_answers_together_counts_the_unfinished():
    assert answers_together() == 1
    assert run_together([answers_together] * 3) == [3, 2, 1]  # each runs to its end in turn


def test_a_failed_batch_fails_each_answer_that_waited_on_it():
    def broken(items):
        raise ValueError(f"{len(items)} items")

    def answer() -> str:
        try:
            merged_call("model", None, broken)
        except ValueError as error:
            return str(error)
        return "no error"

    assert run_together([answer, answer, answer]) == ["3 items"] * 3


def test_an_answer_that_raises_lets_the_others_finish_then_raises():
    finished = []

    def fails():
        merged_call("model", 1, lambda items: items)
        raise KeyError("one answer")

    def works():
        for value in range(3):
            merged_call("model", value, lambda items: items)
        finished.append(True)

    with pytest.raises(KeyError, match="one answer"):
        run_together([fails, works, works])
    assert finished == [True, True]
