"""A model served by any OpenAI-compatible ``/v1/completions`` server that returns log-probs.

vLLM, llama.cpp's Python server (``llama-cpp-python[server]``), Together and Fireworks all
speak this API. Several base URLs (replicas of one model) are used round-robin, and a batch
runs up to ``max_concurrency`` requests at once. Constructing the model sends nothing:

>>> model = OpenAIModel("my-model", base_urls=["http://127.0.0.1:8000/v1"], max_concurrency=2)
>>> model.name, model.extra_body
('my-model', {'repeat_penalty': 1.0, 'min_p': 0.0})
>>> model.close()

What servers give
-----------------
- Only the top-k log-probs of a position (``Distribution.full`` is None) and token texts,
  not ids (``Token.id`` is None). Special tokens, the end of text included, show as ``""``
  (llama.cpp) or as their tag (vLLM).
- The model's raw distribution (temperature 1), also for sampled tokens: servers do not
  report the distribution a sampled token was drawn from.
- A sampled batch with a ``seed`` sends ``seed + row`` for each row, so that copies of one
  prompt (beam search) get different samples, as from one local random stream.
- ``score`` reads the prompt's log-probs from ``echo=True``, as vLLM returns them. No other
  request can make a server score text it did not generate, so a server whose echo is
  missing or wrong (checked once per URL against log-probs it generates) gets a ModelError.
- The context length, where the server lists it: vLLM's ``/v1/models`` gives
  ``max_model_len`` (:attr:`OpenAIModel.context_length`, asked once).

What it costs
-------------
:attr:`OpenAIModel.requests` counts every HTTP request sent, retries included, by path
(``/v1/completions``, ``/extras/tokenize``, ...), and :attr:`OpenAIModel.tokens_received` the
generated tokens that came back (streams stopped early count what was read):

>>> model = OpenAIModel("m", base_urls=["http://127.0.0.1:8000/v1"])
>>> dict(model.requests), model.tokens_received
({}, 0)
>>> model.close()

Errors
------
Every failure is a :class:`ModelError` that names the URL and the model and says what
happened: how many tries the client really made (it retries refused connections, timeouts,
408/409/429 and 5xx answers ``max_retries`` times with backoff, but never a stream that has
begun), a connection closed mid-answer, a 404 from a URL without ``/v1``, a prompt beyond
the server's context.

llama.cpp server (llama-cpp-python) quirks
------------------------------------------
- Even at temperature 0 it applies ``repeat_penalty=1.1`` (and ``min_p=0.05`` when
  sampling): every request sends the neutral ``repeat_penalty=1.0, min_p=0.0``, which vLLM
  reads the same way (``extra_body`` overrides or extends them). Its ``top_k=40`` applies to
  sampling unless ``Sampling.top_k`` is set (or ``extra_body={"top_k": 0}``).
- ``top_logprobs`` is keyed by token text, so equal texts collide (every special token is
  ``""``), and it holds the taken token even when that is outside the top k.
- When the next token ends the text it reports *no* log-probs: a completion simply stops
  there (no empty step), and ``DecodeState.next`` sends ``min_tokens=1``, which keeps the
  end-of-text token out of sampling but not out of the reported log-probs.
- Echoed log-probs are shifted by one token for models without a BOS token (such as
  SmolLM2), so ``score`` refuses such a server; with a BOS token (Gemma) they are right.
- It serves one request at a time, reports most failures as HTTP 500 (the client retries
  them), and cuts a stream short when another request arrives unless started with
  ``--interrupt_requests False`` (``stream`` then raises ModelError).
- It reports its context (``--n_ctx``) nowhere but in the error for a prompt that does not
  fit it; :attr:`OpenAIModel.context_length` is None until then. A ``max_tokens`` beyond the
  context is silently lowered to what fits. A stream that fails (a prompt too long) ends
  without a word: ``stream`` then sends the request unstreamed to learn why.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from towline.models.base import (GREEDY, Completion, DecodeState, Distribution, FinishReason, Model,
                                 ModelError, Sampling, Scored, Step, Token, row_counts)

NEUTRAL_SAMPLING = {"repeat_penalty": 1.0, "min_p": 0.0}
"""Sent with every request: switches off llama.cpp's default penalties; other servers agree."""

TOKENIZER_PROBES = ("Question: What is 12 + 30?\nAnswer: 42", " leading,  double  spaces\tand tabs\n\nnew",
                    "ünïcödé 日本語 😀 café", "x=3*4; print(f'{x:>5}') # 12,345.67 $")
"""Texts a ``tokenizer`` must count as the server does before it counts for that server."""

ECHO_PROBE = "The capital of France is"
ECHO_TOLERANCE = 0.5
"""Nats. Echoed and generated log-probs of one token differ by ~0.1 (batched vs one-by-one
evaluation); echo shifted by one position differs by several nats."""


class OpenAIModel(Model):
    """A model behind one or more OpenAI-compatible servers (see the module docstring).

    ``api_key`` falls back to ``$OPENAI_API_KEY``, then to ``"EMPTY"`` (local servers);
    ``timeout`` (seconds) and ``max_retries`` (with backoff, on 429/5xx/connection errors)
    apply to every request. ``vocabulary`` names the served model's vocabulary (see
    :attr:`Model.vocabulary`; ``load_model`` sets it for registry names); ``end_texts`` are
    the texts its end-of-text tokens show as: ``""`` on llama.cpp, the tags (such as
    ``"<|im_end|>"``) on vLLM.

    ``tokenizer`` (a folder or Hugging Face id of the served model's tokenizer) counts
    tokens here instead of asking the servers (:meth:`count_tokens`): nudging counts each
    round's words, a request a round without it. ``load_model`` passes the converted copy
    of a registry model where one is cached.
    """

    concurrent = True

    def __init__(self, model: str, *, base_urls: Sequence[str], api_key: str | None = None,
                 timeout: float = 120, max_retries: int = 5, max_concurrency: int = 4,
                 extra_body: dict | None = None, chat_template: str | None = None,
                 vocabulary: str | None = None, end_texts: Sequence[str] = ("",),
                 tokenizer: str | None = None) -> None:
        if not base_urls:
            raise ValueError("base_urls must name at least one server")
        self.name = model
        self.chat_template = chat_template
        self.vocabulary = vocabulary
        self.end_texts = frozenset(end_texts)
        self.tokenizer = tokenizer
        self.extra_body = {**NEUTRAL_SAMPLING, **(extra_body or {})}
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.requests: Counter[str] = Counter()
        """HTTP requests sent, retries included, by URL path."""
        self.tokens_received = 0
        """Generated tokens read from the servers' answers."""
        self._clients = {url: openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=max_retries,
                                            http_client=openai.DefaultHttpxClient(
                                                event_hooks={"request": [self._count_request]}))
                         for url in base_urls}
        self._url_cycle = itertools.cycle(base_urls)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix=f"towline-{model}")
        self._token_counters: dict[str, Callable[[str], int]] = {}
        self._echo_checked: set[str] = set()

    def _count_request(self, request: Any) -> None:
        with self._lock:
            self.requests[request.url.path] += 1

    def _received(self, steps: list[Step]) -> list[Step]:
        with self._lock:
            self.tokens_received += len(steps)
        return steps

    def _next_urls(self, count: int) -> list[str]:
        with self._lock:
            return [next(self._url_cycle) for _ in range(count)]

    def _map(self, request: Callable[[str, Any], Any], items: Sequence[Any]) -> list:
        """``request(url, item)`` for every item, concurrently, results in input order.

        URLs are handed out here, in item order, so a batch spreads over the servers
        predictably whatever order the threads run in.
        """
        urls = self._next_urls(len(items))
        if len(items) == 1:
            return [request(urls[0], items[0])]
        return list(self._pool.map(request, urls, items))

    @contextlib.contextmanager
    def _errors(self, url: str) -> Iterator[None]:
        """Turn the client's exceptions into :class:`ModelError` saying what happened at ``url``."""
        try:
            yield
        except openai.APIConnectionError as error:  # timeouts included
            raise ModelError(self._connection_problem(url, error)) from error
        except openai.APIStatusError as error:
            raise ModelError(self._status_problem(url, error)) from error

    def _connection_problem(self, url: str, error: openai.APIConnectionError) -> str:
        tries = _tries(error.request)
        causes = {kind.__name__ for kind in type(error.__cause__).__mro__} if error.__cause__ else set()
        if isinstance(error, openai.APITimeoutError):
            return (f"{url} did not answer for model {self.name} within the timeout ({tries}): the "
                    "server may be overloaded, or the answer too long for the timeout")
        if "RemoteProtocolError" in causes:
            # The client does not retry a stream that breaks off after it started.
            return (f"{url} closed the connection in the middle of an answer of model {self.name} "
                    f"({tries}): the server stopped or crashed; check its log")
        what = "connection refused" if "ConnectError" in causes else str(error.__cause__ or error)
        return (f"cannot reach {url} for model {self.name}: {what} ({tries}). Is the server "
                "running? Start one with `python -m llama_cpp.server --model FILE.gguf` or "
                "`vllm serve MODEL`, or check the URL")

    def _status_problem(self, url: str, error: openai.APIStatusError) -> str:
        body = error.body if isinstance(error.body, dict) else {}
        said = body.get("message") or body.get("detail") or error.message
        tries = _tries(error.response.request)
        problem = f"{url} refused a request for model {self.name} (HTTP {error.status_code}, {tries}): {said}"
        if error.status_code == 404 and not url.rstrip("/").endswith("/v1"):
            return f"{problem}. The URL probably lacks /v1: try {url.rstrip('/')}/v1"
        limit = re.search(r"maximum context length is (\d+) tokens", str(said))
        if limit:
            # The server just said what ``context_length`` could not find out beforehand.
            self.context_length = int(limit.group(1))
            return (f"the request does not fit model {self.name} at {url}, whose context is "
                    f"{limit.group(1)} tokens: shorten the prompt or ask for fewer tokens (the "
                    f"server said: {said})")
        return problem

    def _create(self, url: str, **params: Any) -> Any:
        with self._errors(url):
            return self._clients[url].completions.create(model=self.name, **params)

    def _params(self, max_tokens: int, sampling: Sampling, top_logprobs: int, *,
                seed_offset: int = 0, **body: Any) -> dict[str, Any]:
        extra = {**self.extra_body, **body}
        if sampling.top_k > 0:
            extra["top_k"] = sampling.top_k
        params = dict(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                      logprobs=max(top_logprobs, 1), extra_body=extra)
        if sampling.seed is not None:
            params["seed"] = sampling.seed + seed_offset
        return params

    def complete(self, prompts: Sequence[str], *, max_tokens: int, sampling: Sampling = GREEDY,
                 top_logprobs: int = 1, stop: Sequence[str] = (), lookup: Sequence[str] = ()) -> list[Completion]:
        # ``lookup`` is not sent: servers draft, if at all, by their own settings (vLLM's
        # n-gram speculative decoding looks up the prompt).
        if max_tokens < 1:
            # llama.cpp reads max_tokens=0 as "no limit"; nothing asked for needs no request.
            return [Completion("", [], "length") for _ in prompts]

        def complete_one(url: str, row: tuple[int, str]) -> Completion:
            index, prompt = row
            params = self._params(max_tokens, sampling, top_logprobs, seed_offset=index)
            if stop:
                params["stop"] = list(stop)
            choice = self._create(url, prompt=prompt, **params).choices[0]
            steps = _steps(choice.logprobs, top_logprobs)
            reason = _finish_reason(choice, steps, stop)
            if reason != "length":  # drop the stop string's or end-of-text token's entries
                steps = _within(steps, len(choice.text))
            return Completion(choice.text, self._received(steps), reason)

        return self._map(complete_one, list(enumerate(prompts)))

    def stream(self, prompt: str, *, max_tokens: int, sampling: Sampling = GREEDY,
               top_logprobs: int = 1, lookup: Sequence[str] = ()) -> Generator[Step, None, None]:
        if max_tokens < 1:  # ``lookup``: as for complete
            return
        (url,) = self._next_urls(1)
        params = self._params(max_tokens, sampling, top_logprobs)
        finished = received = False
        with self._errors(url), self._clients[url].completions.create(
            model=self.name, prompt=prompt, stream=True, **params
        ) as chunks:
            for chunk in chunks:
                received = True
                if not chunk.choices:  # a usage-only chunk
                    continue
                choice = chunk.choices[0]
                steps = _steps(choice.logprobs, top_logprobs)
                if choice.finish_reason is not None:
                    finished = True
                    if choice.finish_reason != "length":
                        steps = _within(steps, len(choice.text))
                for step in steps:
                    self._received([step])
                    yield step
        if not finished:
            if not received:
                # llama-cpp-python ends a stream without a word when the request fails (a
                # prompt longer than its context, ...): the same request unstreamed says why.
                self._create(url, prompt=prompt, **self._params(1, sampling, top_logprobs))
            raise ModelError(f"{url} ended a stream of model {self.name} before the model "
                             "finished; llama-cpp-python does this when another request arrives "
                             "(start it with `--interrupt_requests False`) or when it fails (see "
                             "its log)")

    def score(self, prompts: Sequence[str], continuations: Sequence[str], *,
              top_logprobs: int = 1) -> list[Scored]:
        """Score by one ``echo=True`` request on ``prompt + continuation`` per pair.

        The continuation's tokens are the last ``count_tokens(prompt + continuation) -
        count_tokens(prompt)`` tokens of the echoed prompt. That is exact when the prompt ends
        at a token boundary (a newline, a template tag); a continuation that merges with the
        prompt's last characters into one token loses that token's log-prob.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")

        def score_one(url: str, pair: tuple[str, str]) -> Scored:
            if not pair[1]:
                return Scored([])
            self._check_echo(url)
            return Scored(self._echoed_steps(url, *pair, top_logprobs))

        return self._map(score_one, list(zip(prompts, continuations)))

    def open(self, prompts: Sequence[str]) -> DecodeState:
        return _ServerDecodeState(self, prompts)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by the server's own tokenizer (no BOS), via vLLM's ``/tokenize``
        or llama-cpp-python's ``/extras/tokenize``. A server with neither is asked to
        complete ``text`` and ``"a"`` by one token, and the count is read from their
        ``usage.prompt_tokens`` (``"a"`` is one token in every common vocabulary, so its
        count less one is what the server adds, such as a BOS token).

        With a ``tokenizer``, the count is made here, with no request, at each server whose
        own counts of :data:`TOKENIZER_PROBES` it matches (checked once per server; where
        they differ, a warning says so and that server keeps counting)."""
        if not text:
            return 0
        (url,) = self._next_urls(1)
        with self._errors(url):
            if url not in self._token_counters:
                self._token_counters[url] = self._token_counter(url)
            return self._token_counters[url](text)

    @functools.cached_property
    def context_length(self) -> int | None:
        """The context the servers give the model, asked of each once, on first use: vLLM's
        ``/v1/models`` lists it as ``max_model_len`` (the smallest over the URLs counts).
        llama-cpp-python's server reports it nowhere, so it is None (unknown) there until
        a request that does not fit makes the server say it."""
        lengths = []
        for url, client in self._clients.items():
            with self._errors(url):
                try:
                    listing = client.get("/models", cast_to=object)
                except openai.APIStatusError as error:
                    if error.status_code in (404, 405):  # no such route: the length stays unknown
                        continue
                    raise
            length = _context_of(listing, self.name)
            if length is not None:
                lengths.append(length)
        return min(lengths, default=None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()

    def _token_counter(self, url: str) -> Callable[[str], int]:
        server = self._find_token_counter(url)
        if self.tokenizer is None:
            return server
        local = self._local_token_counter
        for probe in TOKENIZER_PROBES:
            here, there = local(probe), server(probe)
            if here != there:
                warnings.warn(f"the tokenizer {self.tokenizer} counts {probe!r} as {here} tokens where the server "
                              f"at {url} counts {there}: {url} counts tokens itself (a request each). Pass the "
                              "served model's own tokenizer, or none.", stacklevel=3)
                return server
        return local

    @functools.cached_property
    def _local_token_counter(self) -> Callable[[str], int]:
        from transformers import AutoTokenizer

        from towline.models.registry import hub_options

        folder = Path(self.tokenizer).expanduser()
        # As the model loaders read a source: a path that exists, else a Hugging Face id.
        source, options = (folder, {}) if folder.exists() else (self.tokenizer, hub_options(self.tokenizer))
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
        except (OSError, ValueError) as error:
            raise ModelError(f"could not load the tokenizer {self.tokenizer!r} of {self.name}: {error}\nGive "
                             "the served model's tokenizer: a folder with its files or a Hugging Face id.") from error
        return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)

    def _find_token_counter(self, url: str) -> Callable[[str], int]:
        root = url.rstrip("/").removesuffix("/v1")
        client = self._clients[url]
        routes = {  # vLLM's, then llama-cpp-python's
            "/tokenize": lambda text: {"model": self.name, "prompt": text, "add_special_tokens": False},
            "/extras/tokenize": lambda text: {"input": text},
        }
        for route, payload in routes.items():
            def tokens(text: str, route: str = route, payload: Callable = payload) -> int:
                return len(client.post(root + route, body=payload(text), cast_to=object)["tokens"])
            try:
                added = tokens("")  # llama-cpp-python's route adds a BOS token
            except openai.APIStatusError as error:
                if error.status_code in (404, 405):  # not this server's route
                    continue
                raise
            return lambda text, tokens=tokens, added=added: tokens(text) - added

        def prompt_tokens(text: str) -> int:
            return self._create(url, prompt=text, **self._params(1, GREEDY, 1)).usage.prompt_tokens
        added = prompt_tokens("a") - 1
        return lambda text: prompt_tokens(text) - added

    def _echoed_steps(self, url: str, prompt: str, continuation: str,
                      top_logprobs: int) -> list[Step]:
        """The steps of ``continuation`` read from an ``echo=True`` request (see :meth:`score`)."""
        count = self.count_tokens(prompt + continuation) - self.count_tokens(prompt)
        response = self._create(url, prompt=prompt + continuation, echo=True,
                                **self._params(1, GREEDY, top_logprobs))
        logprobs = response.choices[0].logprobs
        # The entries are the prompt's tokens (vLLM includes the BOS token, llama.cpp drops
        # it), then the generated ones.
        echoed = len(logprobs.tokens) - response.usage.completion_tokens if logprobs else 0
        if not 0 <= count <= echoed:
            raise ModelError(f"{url} does not return the prompt's log-probs with echo=True, so it "
                             f"cannot score given text for model {self.name}; serve it with vLLM")
        rows = range(echoed - count, echoed)
        if any(logprobs.token_logprobs[i] is None for i in rows):
            raise ModelError(f"{url} has no log-prob for the first token of {continuation!r}: a "
                             "text's first token cannot be scored without a prompt or a BOS token")
        return [Step(Token(logprobs.tokens[i], logprobs.token_logprobs[i]),
                     _top(logprobs.top_logprobs[i], top_logprobs)) for i in rows]

    def _check_echo(self, url: str) -> None:
        """Refuse a server whose echoed log-probs disagree with the ones it generates."""
        if url in self._echo_checked:
            return
        params = self._params(3, GREEDY, 1, min_tokens=1)  # the probe needs tokens to compare
        generated = self._create(url, prompt=ECHO_PROBE, **params).choices[0]
        expected = [round(s.token.logprob, 2) for s in _steps(generated.logprobs, 1)]
        echoed = [round(s.token.logprob, 2)
                  for s in self._echoed_steps(url, ECHO_PROBE, generated.text, 1)]
        if not expected or len(echoed) != len(expected) or any(
                abs(a - b) > ECHO_TOLERANCE for a, b in zip(echoed, expected)):
            raise ModelError(f"{url} cannot score given text for model {self.name}: the log-probs "
                             f"it echoes for {generated.text!r}, {echoed}, are not the {expected} "
                             "it generated them with (llama-cpp-python shifts echoed log-probs by "
                             "one token for models without a BOS token); serve the model with vLLM")
        self._echo_checked.add(url)

    def _next_distributions(self, texts: Sequence[str], top_logprobs: int) -> list[Distribution]:
        top_logprobs = max(top_logprobs, 1)

        def next_one(url: str, text: str) -> Distribution:
            # min_tokens=1: llama.cpp reports nothing when the greedy token ends the text.
            params = self._params(1, GREEDY, top_logprobs, min_tokens=1)
            choice = self._create(url, prompt=text, **params).choices[0]
            steps = _steps(choice.logprobs, top_logprobs)
            if not steps:
                raise ModelError(f"{url} returned no next-token log-probs for model {self.name}: "
                                 "its most likely next token is an end-of-text token that "
                                 "`min_tokens` does not cover, which the server does not report")
            return Distribution(top=steps[0].top)

        return self._map(next_one, texts)


class _ServerDecodeState(DecodeState):
    """Rows of text; each distribution costs one ``max_tokens=1`` request on ``prompt + text``.

    A server keeps no state between requests that towline could address, so ``extend`` sends
    one request per new position (concurrently) and ``truncate`` just forgets text. The
    server tokenizes ``prompt + text`` afresh each time, which may merge appended tokens
    differently from how they were taken.
    """

    def __init__(self, model: OpenAIModel, prompts: Sequence[str]) -> None:
        self._model = model
        self._prompts = list(prompts)
        self._pieces: list[list[str]] | None = [[] for _ in self._prompts]

    def _rows(self) -> list[list[str]]:
        if self._pieces is None:
            raise ValueError("this DecodeState is closed")
        return self._pieces

    def _texts_of(self, rows: Sequence[Sequence[Token | int]]) -> list[list[str]]:
        if len(rows) != len(self._rows()):
            raise ValueError(f"tokens for {len(rows)} rows, but the state has {len(self._rows())}")
        if any(isinstance(token, int) for row in rows for token in row):
            raise ValueError(f"model {self._model.name} is served over HTTP, which takes tokens by "
                             "text: append Tokens taken from its distributions, not ids")
        return [[token.text for token in row] for row in rows]

    def next(self, *, top_logprobs: int = 20) -> list[Distribution]:
        rows = [prompt + "".join(pieces) for prompt, pieces in zip(self._prompts, self._rows())]
        return self._model._next_distributions(rows, top_logprobs)

    def append(self, tokens: Sequence[Token | int]) -> None:
        for pieces, (text,) in zip(self._rows(), self._texts_of([[t] for t in tokens])):
            pieces.append(text)

    def extend(self, tokens: Sequence[Sequence[Token | int]], *,
               top_logprobs: int = 20) -> list[list[Distribution]]:
        new = self._texts_of(tokens)
        texts = [prompt + "".join(pieces) for prompt, pieces in zip(self._prompts, self._rows())]
        queries = [(row, texts[row] + "".join(added[: k + 1])) for row, added in enumerate(new)
                   for k in range(len(added))]
        found = self._model._next_distributions([text for _, text in queries], top_logprobs)
        out: list[list[Distribution]] = [[] for _ in new]
        for (row, _), distribution in zip(queries, found):
            out[row].append(distribution)
        for pieces, added in zip(self._rows(), new):
            pieces.extend(added)
        return out

    def truncate(self, counts: int | Sequence[int]) -> None:
        rows = self._rows()
        for row, count in enumerate(row_counts(counts, len(rows))):
            if count > len(rows[row]):
                raise ValueError(f"row {row} has {len(rows[row])} appended tokens; cannot roll back "
                                 f"{count} (the prompt stays)")
            del rows[row][len(rows[row]) - count:]

    def reorder(self, rows: Sequence[int]) -> None:
        pieces = self._rows()
        self._prompts = [self._prompts[row] for row in rows]
        self._pieces = [list(pieces[row]) for row in rows]

    @property
    def texts(self) -> list[str]:
        return ["".join(pieces) for pieces in self._rows()]

    def close(self) -> None:
        self._pieces = None


def _context_of(listing: Any, name: str) -> int | None:
    """The context length a ``/v1/models`` listing gives the model ``name``: its entry's
    ``max_model_len`` (vLLM), or the only entry's when none has that id (llama-cpp-python lists
    its file path whatever name requests use).

    >>> _context_of({"data": [{"id": "m", "max_model_len": 4096}, {"id": "n"}]}, "m")
    4096
    >>> _context_of({"data": [{"id": "/models/x.gguf", "owned_by": "me"}]}, "m") is None
    True
    """
    entries = [e for e in (listing.get("data") or []) if isinstance(e, dict)] if isinstance(listing, dict) else []
    chosen = [e for e in entries if e.get("id") == name] or (entries if len(entries) == 1 else [])
    lengths = [e["max_model_len"] for e in chosen if isinstance(e.get("max_model_len"), int)]
    return min(lengths, default=None)


def _tries(request: Any) -> str:
    """How many times the client sent a request, read from the retry count it stamps on each
    attempt (``x-stainless-retry-count``, 0 on the first).

    >>> import httpx
    >>> _tries(httpx.Request("POST", "http://h/v1", headers={"x-stainless-retry-count": "5"}))
    '6 tries'
    """
    retries = request.headers.get("x-stainless-retry-count", "0") if request is not None else "0"
    count = int(retries) + 1 if retries.isdigit() else 1
    return "1 try" if count == 1 else f"{count} tries"


def _top(entries: dict[str, float] | None, count: int) -> tuple[Token, ...]:
    """The ``count`` best entries of a ``top_logprobs`` dict, best first.

    >>> _top({"b": -2.0, "a": -0.5, "c": -3.0}, 2)
    (Token(text='a', logprob=-0.5, id=None), Token(text='b', logprob=-2.0, id=None))
    """
    ranked = sorted((entries or {}).items(), key=lambda entry: -entry[1])
    return tuple(Token(text, logprob) for text, logprob in ranked[:count])


def _steps(logprobs: Any, top_logprobs: int) -> list[Step]:
    """One step per entry of a response's ``logprobs`` (none when it has none)."""
    if logprobs is None or not logprobs.tokens:
        return []
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    return [Step(Token(text, logprob), _top(top, top_logprobs))
            for text, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops)]


def _within(steps: list[Step], length: int) -> list[Step]:
    """The steps that start inside the first ``length`` characters of their joined text.

    >>> [s.token.text for s in _within([Step(Token("Hi", 0.0)), Step(Token(".", 0.0))], 2)]
    ['Hi']
    """
    kept, start = [], 0
    for step in steps:
        if start >= length:
            break
        kept.append(step)
        start += len(step.token.text)
    return kept


def _finish_reason(choice: Any, steps: list[Step], stop: Sequence[str]) -> FinishReason:
    if choice.finish_reason == "length":
        return "length"
    extra = choice.model_extra or {}
    if "stop_reason" in extra:
        # vLLM names the stop string that matched; None or a token id is the model's own end.
        return "stop" if isinstance(extra["stop_reason"], str) else "end"
    if not stop:
        return "end"
    # llama.cpp cuts a stop string off the text but still reports its tokens, while the
    # end-of-text token is never reported: tokens running past the text mean a stop string.
    return "stop" if sum(len(s.token.text) for s in steps) > len(choice.text) else "end"
