"""How requests reach the models.

Concurrency policy: **one request at a time per model, in arrival order.** A local model's
torch module, its tokenizer and its shared prefix cache are not safe to use from two
threads at once, so every model has a first-come-first-served lock (:class:`FifoLock`).
A request to a model served as itself holds that model's lock while it decodes; a request
to an aligned composite holds the locks of all its models (taken in one global order, so
two composites sharing models cannot deadlock). Requests to different models run in
parallel. Each request's work runs in its own thread (:class:`Job`) and hands its output
to the event loop through its own queue, so outputs are never mixed up. Cancelling a job
(the client went away) stops it at the next decoded token: the model's stream is closed,
which ends its decoding, and the lock passes to the next request.

Tokenizing (``/tokenize``, the prompt-length checks done before a request queues) uses a
second copy of each tokenizer with its own lock, so it never waits behind a decoding.

Text is what ``LocalModel.complete`` returns: the decoded token ids, cut before the first
stop string. A stream hands out that text as it becomes final, holding back a tail that may
still turn into a stop string or that ends inside a multi-byte character.

>>> held_back("The answer is 4 <|e", ["<|end|>"], 0), held_back("caf\ufffd", [], 0)
(3, 1)
>>> first_stop("a, b. c", [".", ","], 0)
(1, ',')
"""

from __future__ import annotations

import asyncio
import collections
import copy
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from towline.methods.base import Method
from towline.models.base import DecodeState, Delegating, Model, Sampling, Scored, ScoreState, Step, Token
from towline.models.local import LocalModel


class Cancelled(BaseException):
    """The client went away: stop the work. A BaseException, like GeneratorExit, so that a
    method catching its models' errors (``except Exception``) does not swallow it."""


class FifoLock:
    """A lock granted in arrival order (a plain ``threading.Lock`` wakes waiters in no set
    order, which would let one client starve). ``acquire`` gives up when ``cancelled`` is set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()
        self._held = False

    def acquire(self, cancelled: threading.Event) -> None:
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._held or self._waiting[0] is not ticket:
                    if cancelled.is_set():
                        raise Cancelled
                    self._cond.wait(0.1)
                self._held = True
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


class LockTable:
    """One :class:`FifoLock` per model that serves one caller at a time (see
    :attr:`Model.concurrent`), and the one order to take several in."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[int, FifoLock, Model]] = {}

    def locks(self, models: Sequence[Model | Method]) -> list[FifoLock]:
        """The locks of ``models`` (and methods that hold state of their own) that serve one
        caller at a time, in the one order."""
        models = [m for m in models if not m.concurrent]  # a server takes requests side by side
        for model in models:
            if id(model) not in self._locks:  # the model is kept, so its id stays its own
                self._locks[id(model)] = (len(self._locks), FifoLock(), model)
        entries = sorted({self._locks[id(m)][:2] for m in models}, key=lambda entry: entry[0])
        return [lock for _, lock in entries]


class Job:
    """Work run in its own thread; what it sends arrives, in order, on the event loop.

    ``work(job)`` runs once every lock in ``locks`` is held and calls ``job.send(item)`` for
    each piece of output; its return value ends the stream of events. Create a job on the
    event loop's thread.
    """

    def __init__(self, work: Callable[[Job], Any], locks: Sequence[FifoLock], *, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()
        self.started: float | None = None  # when the locks were granted
        self.result: Any = None
        self._thread = threading.Thread(target=self._run, args=(work, locks), name=name, daemon=True)
        self._thread.start()

    def send(self, item: Any) -> None:
        """Called by the work: hand ``item`` to the event loop, or stop if cancelled."""
        self.check()
        self._post("item", item)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled

    def cancel(self) -> None:
        self.cancelled.set()

    def _post(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (the server stopped): nobody listens
            self.cancelled.set()

    def _run(self, work: Callable[[Job], Any], locks: Sequence[FifoLock]) -> None:
        try:
            with _holding(locks, self.cancelled):
                self._post("started", time.perf_counter())
                result = work(self)
            self._post("done", result)
        except Cancelled:
            self._post("cancelled", None)
        except BaseException as error:  # handed to the request, which reports it
            self._post("error", error)

    async def items(self) -> AsyncIterator[Any]:
        """Every item sent, then ends (``self.result`` is set); re-raises the work's error."""
        while True:
            kind, value = await self._events.get()
            if kind == "item":
                yield value
            elif kind == "started":
                self.started = value
            elif kind == "done":
                self.result = value
                return
            elif kind == "error":
                raise value
            else:
                raise Cancelled


@contextmanager
def _holding(locks: Sequence[FifoLock], cancelled: threading.Event) -> Iterator[None]:
    taken: list[FifoLock] = []
    try:
        for lock in locks:
            lock.acquire(cancelled)
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


class Watched(Delegating):
    """A composite's model as its method sees it: every call, and every streamed token,
    first checks that the request is still wanted, so a cancelled composite stops within a
    token or one model call."""

    def __init__(self, model: Model, job: Job) -> None:
        super().__init__(model)
        self.job = job

    def complete(self, prompts, **kwargs):
        self.job.check()
        return self.model.complete(prompts, **kwargs)

    def stream(self, prompt, **kwargs) -> Generator[Step, None, None]:
        self.job.check()
        with closing(self.model.stream(prompt, **kwargs)) as steps:
            for step in steps:
                self.job.check()
                yield step

    def score(self, prompts, continuations, **kwargs) -> list[Scored]:
        self.job.check()
        return self.model.score(prompts, continuations, **kwargs)

    def open(self, prompts) -> DecodeState:
        self.job.check()
        return self.model.open(prompts)

    def open_scoring(self, prompts) -> ScoreState:
        self.job.check()
        return self.model.open_scoring(prompts)


class Words:
    """A served model's own tokenizer copy, for work that must not wait behind decoding."""

    def __init__(self, model: LocalModel) -> None:
        # A LocalModel over the same weights with a copied tokenizer: its encode and
        # count_tokens are the served model's, on a tokenizer no decoding thread touches.
        # It never runs the weights.
        self._twin = LocalModel(model.model, copy.deepcopy(model.tokenizer), name=model.name, reuse_prefix=False)
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt as the model will see it (with its BOS token)."""
        with self._lock:
            return self._twin.encode(text)

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        with self._lock:
            return self._twin.tokenizer(text, add_special_tokens=special).input_ids

    def strings(self, ids: Sequence[int]) -> list[str]:
        with self._lock:
            return self._twin.tokenizer.convert_ids_to_tokens(list(ids))

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self._twin.tokenizer.decode(list(ids))


# -- decoding a local model ------------------------------------------------------------------

@dataclass
class Delta:
    """New output of choice ``index``: ``text`` and the ``steps`` behind it. ``echo`` marks
    the prompt handed back (its first step is None: the first token has no log-prob, and
    ``first`` is that token); ``role`` is the composite role that wrote the text."""

    index: int
    text: str
    steps: list[Step | None] = field(default_factory=list)
    echo: bool = False
    first: Token | None = None
    role: str | None = None


@dataclass
class Finish:
    """Choice ``index`` is done: towline's finish reason, and the stop string that matched."""

    index: int
    reason: str
    stop: str | None = None
    extra: dict[str, Any] | None = None


def first_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (position, stop), or None."""
    found = [(text.find(s, start), s) for s in stops]
    found = [(at, s) for at, s in found if at >= 0]
    return min(found, key=lambda hit: (hit[0], -len(hit[1]))) if found else None


def held_back(text: str, stops: Sequence[str], released: int) -> int:
    """How many characters at the end of ``text`` (past ``released``) must wait: the
    longest tail that begins a stop string, or a trailing incomplete character."""
    room = len(text) - released
    hold = 1 if text.endswith("\ufffd") and room else 0
    for stop in stops:
        for length in range(min(len(stop) - 1, room), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return hold


def generate(model: LocalModel, prompt: str, *, index: int, max_tokens: int, sampling: Sampling,
             top_logprobs: int, stops: Sequence[str], min_tokens: int, job: Job) -> tuple[int, str, str | None]:
    """Decode one choice, sending :class:`Delta` s as text becomes final and a :class:`Finish`.
    Returns the number of tokens, the finish reason and the stop string that matched."""
    if min_tokens:
        source = _greedy_without_early_end(model, prompt, max_tokens=max_tokens,
                                           top_logprobs=top_logprobs, min_tokens=min_tokens)
    else:
        source = model.stream(prompt, max_tokens=max_tokens, sampling=sampling, top_logprobs=top_logprobs)
    ids: list[int] = []
    pending: list[Step | None] = []
    text, released, reason, matched = "", 0, "", None
    with closing(source):  # leaving early (a stop string, a cancel) ends the decoding
        for step in source:
            job.check()
            ids.append(step.token.id)
            pending.append(step)
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            hit = first_stop(text, stops, released)
            if hit:
                text, matched, reason = text[:hit[0]], hit[1], "stop"
                break
            ready = len(text) - held_back(text, stops, released)
            if ready > released:
                job.send(Delta(index, text[released:ready], pending))
                pending, released = [], ready
    if not reason:
        reason = "length" if len(ids) == max_tokens else "end"
    if pending or len(text) > released:
        job.send(Delta(index, text[released:], pending))
    job.send(Finish(index, reason, matched))
    return len(ids), reason, matched


def _greedy_without_early_end(model: LocalModel, prompt: str, *, max_tokens: int, top_logprobs: int,
                              min_tokens: int) -> Generator[Step, None, None]:
    """Greedy decoding through :meth:`Model.open` where the end of text may not be chosen
    before ``min_tokens`` tokens (vLLM's ``min_tokens``); the reported distributions still
    hold the end-of-text token, as vLLM's and llama.cpp's do."""
    state = model.open([prompt])
    shown = max(top_logprobs, 1)
    for position in range(max_tokens):
        (distribution,) = state.next(top_logprobs=shown + len(model.end_ids))
        ranked = distribution.top
        choice = ranked[0]
        if choice.id in model.end_ids:
            if position >= min_tokens:
                return
            choice = next(t for t in ranked if t.id not in model.end_ids)
        yield Step(choice, ranked[:shown])
        if position < max_tokens - 1:
            state.append([choice])


def prompt_steps(model: LocalModel, prompt: str, *, top_logprobs: int) -> tuple[Token, list[Step]]:
    """The prompt's first token (it has no log-prob) and a step for each later token: what
    ``echo`` returns, scored in one pass."""
    first_id = model.encode(prompt)[0]
    (scored,) = model.score([""], [prompt], top_logprobs=max(top_logprobs, 1))
    return Token(model.tokenizer.decode([first_id]), float("nan"), first_id), scored.steps
