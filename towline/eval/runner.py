"""The evaluation runner: methods x tasks x items, resumable, one JSON line per finished item.

A run lives in one folder:

- ``config.json``: what was run (methods with their models and options, data sets, sample
  size and seed, prompt overrides, judge). Resuming with a different configuration is refused.
- ``results.jsonl``: one line per finished item, appended (flushed and fsynced) the moment it
  finishes, so killing the run loses only the items in flight. ``--resume`` skips every item
  already there; a line torn by a kill is cut off before new lines are added.
- ``summary.json`` and ``summary.md``: accuracy per task and method, the average over tasks,
  the guide's share of the output, model calls, tokens and seconds.

Items run on a thread pool with at most ``workers`` in flight. Models are loaded once per run
and shared by every method that names them. A model on local weights serves one item at a
time (its decoding state is not thread-safe), so items wait for it; a server model takes
``workers`` requests at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from towline.eval import checking
from towline.eval.datasets import SAMPLE_SEED, Row, load, sample
from towline.eval.judge import KINDS, Judge, Judgement
from towline.eval.summary import Summary, summarize
from towline.files import write_atomic
from towline.eval.tasks import Task, task
from towline.methods import OptionError, method_class
from towline.methods.base import PromptTooLong, Result
from towline.models import load_model
from towline.models.base import Model, ModelError, Sampling
from towline.prompts import PromptRequest

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".lock"
CONFIG_VERSION = 1
PROMPT_PARTS = ("system", "question_prefix", "context", "answer_start")


class RunError(RuntimeError):
    """The run cannot start or go on; the message says what to do."""


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides a run's results (``workers`` does not, so it is not here).

    ``methods`` maps each method name to its :func:`towline.compose` keyword arguments
    (models as spec strings); ``prompt`` holds prompt overrides (None: the task's own)."""

    datasets: tuple[str, ...]
    methods: dict[str, dict[str, Any]]
    num_samples: int | None = 100
    sample_seed: int = SAMPLE_SEED
    source: str = "bundled"
    data: str | None = None
    prompt: dict[str, str | None] = field(default_factory=dict)
    judge: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data_hash = None
        if self.data is not None:
            data_hash = hashlib.sha256(Path(self.data).read_bytes()).hexdigest()
        return {
            "version": CONFIG_VERSION,
            "datasets": list(self.datasets),
            "methods": {name: {k: _jsonable(v) for k, v in sorted(kwargs.items())}
                        for name, kwargs in self.methods.items()},
            "num_samples": self.num_samples,
            "sample_seed": self.sample_seed,
            "source": self.source,
            "data": str(Path(self.data).resolve()) if self.data else None,
            "data_sha256": data_hash,
            "prompt": {k: self.prompt.get(k) for k in PROMPT_PARTS},
            "judge": self.judge,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Sampling):
        return dataclasses.asdict(value)
    if isinstance(value, Model):
        return value.name
    return value


@dataclass(frozen=True)
class Job:
    method: str
    task: Task
    index: int
    row: Row

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.method, self.task.name, self.row["id"])


@dataclass
class Outcome:
    result: dict[str, Any] | None
    judgement: Judgement | None
    error: str | None = None


class RunFolder:
    """The run folder: its lock, its configuration, and the results file, append-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results_path = path / RESULTS_FILE
        self.config_path = path / CONFIG_FILE
        self._lock = FileLock(str(path / LOCK_FILE))
        self._file = None

    def __enter__(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunError(f"another towline eval is writing to {self.path}; wait for it to finish") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self._lock.release()

    def start(self, config: dict[str, Any], *, resume: bool) -> list[dict[str, Any]]:
        """Check or write the configuration; return the records already finished."""
        if self.config_path.exists():
            old = json.loads(self.config_path.read_text(encoding="utf-8"))
            if not resume:
                raise RunError(f"{self.path} already holds a run: add --resume to finish it, "
                               "or choose another --out")
            if old != config:
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise RunError(f"{self.path} was run with a different configuration ({', '.join(changed)} "
                               "differ): resume it with the same command, or choose another --out")
        else:
            if self.results_path.exists():
                raise RunError(f"{self.path} holds results but no {CONFIG_FILE}: choose another --out")
            write_atomic(self.config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        records = read_results(self.results_path, repair=True)
        self._file = self.results_path.open("a", encoding="utf-8")
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished item: one line, flushed and fsynced before the next one starts."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def read_results(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a results file, each item once (the first record of a key wins).

    A last line without its newline was torn by a kill: it is ignored, and with ``repair``
    cut off the file so that new lines start clean."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with path.open("r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    records, seen = [], set()
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{path}, line {number} is not JSON: the file was edited; "
                           "remove that line and resume") from None
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def record_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return (record["method"], record["task"], record["id"])


class _Models:
    """Every model of the run, opened once per spec and shared between methods, each local
    one with the lock that makes it serve one item at a time."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._open: dict[str, Model] = {}
        self.locks: dict[int, threading.Lock] = {}

    def get(self, spec: str | Model) -> Model:
        if isinstance(spec, Model):
            model = spec
        else:
            if spec not in self._open:
                self._open[spec] = self._stack.enter_context(load_model(spec))
            model = self._open[spec]
        if not model.concurrent:
            self.locks.setdefault(id(model), threading.Lock())
        return model


def _compose(stack: ExitStack, models: _Models, name: str, kwargs: dict[str, Any]):
    from towline.api import compose, split_arguments

    cls = method_class(name)
    split_arguments(cls, kwargs)  # every option checked before any model loads
    resolved = dict(kwargs)
    for role in cls.roles:
        spec = kwargs.get(role.name, role.default)
        if spec is None:
            raise OptionError(role.name, f"method {name!r} needs a {role.name} model")
        resolved[role.name] = models.get(spec)
    aligned = stack.enter_context(compose(method=name, **resolved))
    if not aligned.method.concurrent:  # state of its own (a search's local scorer): one answer at a time
        models.locks[id(aligned.method)] = threading.Lock()
    users = {id(p.model) for p in aligned.participants.values()} | {id(aligned.method)}
    return aligned, [models.locks[i] for i in sorted(users & set(models.locks))]


def plan(config: EvalConfig) -> list[Job]:
    """Every (method, task, item) of the run, interleaved so that a stopped run is a fair
    comparison: the first sampled item of every task, then the second, ...; each item by every
    method before the next."""
    samples = []
    for name in config.datasets:
        rows = sample(load(name, source=config.source, data=config.data), config.num_samples,
                      seed=config.sample_seed)
        samples.append((task(name), rows))
    jobs = []
    for index in range(max(len(rows) for _, rows in samples)):
        for the_task, rows in samples:
            if index < len(rows):
                jobs.extend(Job(method, the_task, index, rows[index]) for method in config.methods)
    return jobs


def evaluate(config: EvalConfig, out: str | Path, *, workers: int = 1, batch_size: int = 1, resume: bool = False,
             progress: Callable[[int, int], Any] | None = None) -> Summary:
    """Run (or finish, with ``resume``) the evaluation in folder ``out`` and return its summary.

    ``progress(done, total)`` is a context-manager factory yielding a callback that gets each
    finished record (the CLI's progress bar). Models given as open :class:`Model` objects in
    ``config.methods`` are used as they are (and left open). ``batch_size`` items of one
    method are answered together where the method can decode them as one batch (see
    :meth:`Method.run_batch`)."""
    if workers < 1:
        raise RunError(f"--workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {batch_size}")
    if len(config.datasets) > 1 and config.data is not None:
        raise RunError("--data gives the rows of one data set: name exactly one with --dataset")
    for name in config.datasets:
        task(name)
    for name in config.methods:
        method_class(name)
    folder_path = Path(out)
    jobs = plan(config)
    judge = Judge(config.judge) if config.judge else None
    started = time.perf_counter()
    with RunFolder(folder_path) as folder:
        records = folder.start(config.to_dict(), resume=resume)
        done = {record_key(r) for r in records}
        todo = [job for job in jobs if job.key not in done]
        with ExitStack() as stack:
            models = _Models(stack)
            needed = {job.method for job in todo}  # a finished run loads no model
            composed = {name: _compose(stack, models, name, kwargs) for name, kwargs in config.methods.items()
                        if name in needed}
            overrides = {k: v for k, v in config.prompt.items() if v is not None}
            callback_factory = progress or _no_progress
            with callback_factory(len(jobs) - len(todo), len(jobs)) as on_record:
                for record in _run_jobs(batches(todo, batch_size), composed, judge, overrides, workers):
                    folder.append(record)
                    records.append(record)
                    on_record(record)
    summary = summarize(config.to_dict(), records, jobs=[job.key for job in jobs],
                        seconds=time.perf_counter() - started)
    summary.save(folder_path)
    return summary


class _no_progress:
    def __init__(self, done: int, total: int) -> None:
        pass

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        return lambda record: None

    def __exit__(self, *exc: object) -> None:
        pass


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """The jobs in groups of up to ``size`` of one method, in plan order: a group is
    emitted once it is full (or at the end), so a stopped run stays close to the plan's
    fair order.

    >>> from towline.eval.tasks import task
    >>> jobs = [Job(m, task("gsm8k"), i, {"id": str(i)}) for i in range(3) for m in ("a", "b")]
    >>> [[(j.method, j.index) for j in group] for group in batches(jobs, 2)]
    [[('a', 0), ('a', 1)], [('b', 0), ('b', 1)], [('a', 2)], [('b', 2)]]
    """
    groups: list[list[Job]] = []
    filling: dict[str, list[Job]] = {}
    for job in jobs:
        group = filling.setdefault(job.method, [])
        group.append(job)
        if len(group) == size:
            groups.append(filling.pop(job.method))
    groups.extend(filling.values())
    return groups


def _run_jobs(groups: list[list[Job]], composed: dict[str, Any], judge: Judge | None,
              overrides: dict[str, str], workers: int) -> Iterable[dict[str, Any]]:
    """Run the groups of jobs with at most ``workers`` in flight; yield each finished record
    in the main thread (answer checking runs there: math-verify's timeouts need the main
    thread)."""
    pending = iter(groups)
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="towline-eval")
    inflight: dict[Future, list[Job]] = {}
    try:
        while True:
            while failure is None and len(inflight) < workers:
                group = next(pending, None)
                if group is None:
                    break
                inflight[pool.submit(_work, group, composed[group[0].method], judge, overrides)] = group
            if not inflight:
                break
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in finished:
                group = inflight.pop(future)
                try:
                    outcomes = future.result()
                except BaseException as error:  # noqa: BLE001 -- re-raised once the other items finish
                    failure = failure or error
                    continue
                for job, outcome in zip(group, outcomes, strict=True):
                    yield _record(job, outcome, overrides)
    finally:
        pool.shutdown(wait=failure is not None, cancel_futures=True)
    if failure is not None:
        if isinstance(failure, (ModelError, RunError)):
            raise RunError(f"{failure}\nThe finished items are saved: fix this and rerun with --resume.") from failure
        raise failure


def _work(group: list[Job], composed: tuple[Any, list[threading.Lock]], judge: Judge | None,
          overrides: dict[str, str]) -> list[Outcome]:
    """Answer a group of one method's jobs (as one batch where the method can), then judge."""
    aligned, locks = composed
    requests = [job.task.request(job.row, **overrides) for job in group]
    with ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        results = _answer(aligned, requests)
    outcomes = []
    for job, result in zip(group, results, strict=True):
        if isinstance(result, PromptTooLong):
            # The item itself does not fit (a long question): record it, do not retry it.
            outcomes.append(Outcome(None, None, error=str(result)))
            continue
        if result.stop_reason == "error":
            raise RunError(f"{job.method} failed on {job.task.name} item {job.row['id']}: {result.error}")
        judgement = None
        if judge is not None and job.task.judge in KINDS:
            judgement = judge.judge(job.task.judge, question=job.row["question"], answer=result.text,
                                    gold=job.task.gold(job.row))
        outcomes.append(Outcome(result.to_dict(), judgement))
    return outcomes


def _answer(aligned: Any, requests: list[PromptRequest]) -> list[Result | PromptTooLong]:
    """Each request's result, or the error saying it does not fit its model. A batch that
    fails (one request too long, a model that cannot decode the batch) is answered again a
    request at a time, so that each gets its own outcome."""
    if len(requests) > 1:
        try:
            return aligned.generate_batch(requests)
        except (PromptTooLong, ModelError):
            pass
    results: list[Result | PromptTooLong] = []
    for request in requests:
        try:
            results.append(aligned.generate(request))
        except PromptTooLong as error:
            results.append(error)
    return results


def _record(job: Job, outcome: Outcome, overrides: dict[str, str]) -> dict[str, Any]:
    """The results line of one finished item."""
    request = job.task.request(job.row, **overrides)
    record = {
        "method": job.method, "task": job.task.name, "id": job.row["id"], "index": job.index,
        "question": job.row["question"], "context": request.context, "answer": job.row["answer"],
        "gold": job.task.gold(job.row), "correct": None, "score": None, "rule": None,
        "judge": outcome.judgement.to_dict() if outcome.judgement else None,
        "error": outcome.error, "result": outcome.result,
    }
    return score_record(record, job.task, job.row, request)


def score_record(record: dict[str, Any], the_task: Task, row: Row, request: PromptRequest) -> dict[str, Any]:
    """Fill in a record's rule verdict (the task's checker on the answer, up to where the
    prompt's question prefix or system text comes back), ``correct`` (the rule's, else the
    judge's; False for a skipped item) and ``score``. ``towline report --recheck`` calls it
    again with today's checkers."""
    result, judged = record.get("result"), record.get("judge")
    rule = None
    if result is not None and the_task.checker is not None:
        region = checking.answer_region(result["text"], request.question_prefix, request.system)
        check = the_task.checker(region, row)
        rule = {"correct": check.correct, "extracted": check.extracted, "score": check.score}
    correct = rule["correct"] if rule else (judged.get("correct") if judged else None)
    score = (rule or {}).get("score")
    if score is None and judged:
        score = judged.get("score")
    return {**record, "rule": rule, "correct": False if record.get("error") else correct, "score": score}
