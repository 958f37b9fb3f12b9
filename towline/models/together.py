"""Answers run side by side, taking turns, so that a backend can merge their model calls.

A method written as plain blocking calls (nudging asks the guide, then streams the base, ...)
answers several requests at once by running each in its own thread under
:func:`run_together`. The threads take turns: one runs at a time, until it makes a call that a
backend routes through :func:`merged_call` or until its answer is done. When every unfinished
answer waits on such a call, the waiting calls of the key (the backend object) most of them
wait on run as one batch (on local weights: one forward pass over all the rows), and those
answers go on in their original order. Nothing runs concurrently, so the answers may share
models and tokenizers that are not thread-safe; what each answer computes is what it computes
alone, up to the rounding of batched passes.

>>> log = []
>>> def double_all(items):
...     log.append(list(items))
...     return [2 * item for item in items]
>>> run_together([lambda: merged_call("model", 1, double_all) + merged_call("model", 10, double_all),
...               lambda: merged_call("model", 2, double_all)])
[22, 4]
>>> log
[[1, 2], [10]]

Outside :func:`run_together`, :func:`merged_call` simply computes its one item.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")
Out = TypeVar("Out")

_local = threading.local()


@dataclass
class _Call:
    key: Hashable
    item: Any
    compute: Callable[[list[Any]], list[Any]]
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Turns:
    """Whose turn it is, and the calls waiting to be merged."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    ready: deque[int] = field(default_factory=deque)
    """Answers that may run, in the order they get their turns."""
    waiting: dict[int, _Call] = field(default_factory=dict)
    turn: int | None = None
    unfinished: int = 0

    def wait_for_turn(self, index: int) -> None:
        """Block until it is answer ``index``'s turn (call with ``condition`` held)."""
        self.condition.wait_for(lambda: self.turn == index)

    def pass_turn(self) -> None:
        """Give the turn to the next ready answer; when none is ready, run the waiting calls of
        one key first (call with ``condition`` held, by the answer whose turn ends)."""
        if not self.ready and self.waiting:
            self._run_waiting()
        self.turn = self.ready.popleft() if self.ready else None
        self.condition.notify_all()

    def _run_waiting(self) -> None:
        """Run the waiting calls of the key most answers wait on (the others wait on): answers
        then tend to fall into step, which makes the next merged batches larger."""
        by_key: dict[Hashable, list[int]] = {}
        for index in sorted(self.waiting):
            by_key.setdefault(self.waiting[index].key, []).append(index)
        indices = max(by_key.values(), key=len)
        calls = [self.waiting.pop(i) for i in indices]
        try:
            results = calls[0].compute([c.item for c in calls])
            for call, result in zip(calls, results, strict=True):
                call.result = result
        except BaseException as error:  # noqa: BLE001 -- raised in each waiting answer's thread
            for call in calls:
                call.error = error
        self.ready.extend(indices)


def in_together() -> bool:
    """Whether this thread runs an answer under :func:`run_together`."""
    return getattr(_local, "turns", None) is not None


def answers_together() -> int:
    """How many unfinished answers run together with this thread's, itself included; 1 outside
    :func:`run_together`."""
    turns: _Turns | None = getattr(_local, "turns", None)
    return turns.unfinished if turns is not None else 1


def merged_call(key: Hashable, item: Item, compute: Callable[[list[Item]], list[Out]]) -> Out:
    """``compute([item])[0]``, merged with the waiting calls of the same ``key`` when this
    thread runs under :func:`run_together`: ``compute`` then gets every such item at once,
    in the answers' order, and returns one result per item. An error ``compute`` raises is
    raised in every answer that waited on it."""
    turns: _Turns | None = getattr(_local, "turns", None)
    if turns is None:
        return compute([item])[0]
    index: int = _local.index
    call = _Call(key, item, compute)
    with turns.condition:
        turns.waiting[index] = call
        turns.pass_turn()
        turns.wait_for_turn(index)
    if call.error is not None:
        raise call.error
    return call.result


def run_together(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """Run every task in a thread of its own, taking turns (see the module's docstring); the
    results in order. The first error a task raises is raised once every task has ended."""
    turns = _Turns(ready=deque(range(len(tasks))), unfinished=len(tasks))
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)

    def answer(index: int) -> None:
        _local.turns, _local.index = turns, index
        with turns.condition:
            turns.wait_for_turn(index)
        try:
            results[index] = tasks[index]()
        except BaseException as error:  # noqa: BLE001 -- re-raised by run_together
            errors[index] = error
        finally:
            with turns.condition:
                turns.unfinished -= 1
                turns.pass_turn()

    threads = [threading.Thread(target=answer, args=(i,), name=f"towline-together-{i}", daemon=True)
               for i in range(len(tasks))]
    with turns.condition:
        turns.turn = turns.ready.popleft() if turns.ready else None
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
