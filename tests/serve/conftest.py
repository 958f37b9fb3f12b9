"""Real towline servers on 127.0.0.1 (uvicorn in a thread) over tiny random-init models,
driven over HTTP by the official ``openai`` client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import openai
import pytest
import uvicorn

import towline
from towline.models.local import LocalModel
from towline.serve.app import create_app

START_TIMEOUT_S = 30
COMPOSITE_OPTIONS = {"gamma": 0.4, "max_tokens": 24}


@contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yields the base URL (without ``/v1``)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]  # port 0: the system chose a free one
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def uncached(model: LocalModel, name: str) -> LocalModel:
    """The same weights and tokenizer without prefix-cache reuse: every call computes its
    prompt from scratch, so a result depends on the prompt alone and not on which calls the
    model served before. A served model and its local reference built this way run the same
    fp32 code on the same inputs, so their greedy outputs are equal exactly."""
    return LocalModel(model.model, model.tokenizer, name=name, reuse_prefix=False)


@pytest.fixture(scope="session")
def no_prefix_cache() -> Callable[[LocalModel, str], LocalModel]:
    """``no_prefix_cache(model, name)``: see :func:`uncached`."""
    return uncached


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., str]]:
    """``serve(models, composites, **options)``: a server for the rest of the session; returns its URL."""
    with ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(running(create_app(*args, **kwargs)))


@pytest.fixture(scope="session")
def base(tiny_base) -> LocalModel:
    return uncached(tiny_base, "tiny-base")


@pytest.fixture(scope="session")
def guide(tiny_guide) -> LocalModel:
    return uncached(tiny_guide, "tiny-guide")


@pytest.fixture(scope="session")
def aligned(base, guide) -> towline.Aligned:
    """Nudging over the two tiny models: served as ``aligned``, and the local reference."""
    return towline.compose(method="nudging", base=base, guide=guide, **COMPOSITE_OPTIONS)


@pytest.fixture(scope="session")
def url(serve, base, guide, tiny_base, aligned) -> str:
    """The main test server: the tiny models as themselves (``tiny-cached`` reuses its
    prefix cache across requests) and the nudging composite."""
    return serve({"tiny-base": base, "tiny-guide": guide, "tiny-cached": tiny_base}, {"aligned": aligned})


@pytest.fixture
def client(url) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
