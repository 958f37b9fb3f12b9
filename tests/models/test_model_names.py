"""Model arguments that name nothing: a clear error at once, with the closest registry names,
whether the Hugging Face Hub is offline, unreachable or answering. Real processes (the Hub
client reads its settings at import) against real sockets on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

MISSPELT = "smolm2-135m-instruct"
LOAD = "import sys; from towline.models import load_model; print(load_model(sys.argv[1]).name)"


def load(name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, name], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1", **env})


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A Hub address that accepts connections and never answers, as a black-holed network does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def closed_endpoint() -> str:
    """A Hub address where nothing listens: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def empty_hub() -> Iterator[str]:
    """A reachable Hub that knows no model: 404 for every request."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.do_HEAD = server.RequestHandlerClass.do_GET = (
        lambda handler: handler.send_error(404, "Repository not found"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def assert_helpful(done: subprocess.CompletedProcess, reason: str) -> None:
    assert done.returncode != 0
    message = done.stderr.rpartition("ModelError: ")[2]  # the error, after the traceback
    assert message.startswith(f"unknown model '{MISSPELT}'") and reason in message, done.stderr[-2000:]
    assert "Did you mean smollm2-135m-instruct?" in message
    assert "a .gguf file, a local model directory, a Hugging Face id" in message and "openai:MODEL@URL" in message


def test_a_misspelt_name_fails_at_once_when_the_hub_is_offline():
    assert_helpful(load(MISSPELT, HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE is set")


def test_a_misspelt_name_fails_at_once_when_the_hub_does_not_answer(silent_endpoint):
    assert_helpful(load(MISSPELT, HF_ENDPOINT=silent_endpoint), f"{silent_endpoint} cannot be reached")


def test_a_misspelt_name_is_still_explained_when_the_hub_answers(empty_hub):
    assert_helpful(load(MISSPELT, HF_ENDPOINT=empty_hub), "the Hugging Face Hub could not provide it")


def test_a_name_that_cannot_be_a_hub_id_fails_before_asking_the_hub(silent_endpoint):
    done = load("smollm2 135m", HF_ENDPOINT=silent_endpoint)
    assert done.returncode != 0
    assert "not a registry name, an existing file or directory, or a Hugging Face id" in done.stderr
    assert "Did you mean smollm2-135m-instruct?" in done.stderr


def test_a_hub_id_in_the_local_cache_loads_while_the_hub_is_unreachable(tiny_base, tmp_path, closed_endpoint):
    snapshot = tmp_path / "hub" / "models--towline-test--tiny-llama" / "snapshots" / ("0" * 40)
    tiny_base.model.save_pretrained(snapshot)
    tiny_base.tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    done = load("towline-test/tiny-llama", HF_HOME=str(tmp_path), HF_ENDPOINT=closed_endpoint)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "towline-test/tiny-llama"
