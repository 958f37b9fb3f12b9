"""Real llama.cpp servers (llama-cpp-python) for the tests of server-backed models."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from towline.models.base import ModelError
from towline.models.registry import gguf_file

SERVER_SCRIPT = Path(__file__).with_name("llama_server.py")
READY_TIMEOUT_S = 90

# TEMPORARY (lead: delete this map once the test machines have run `towline models pull`):
# copies of the registry models fetched by the setup script before the registry existed.
_PRE_REGISTRY_COPIES = {"smollm2-135m-instruct": "/tmp/m/smol.gguf", "gemma-3-270m": "/tmp/m/gemma.gguf"}


def registry_gguf(name: str) -> Path:
    """The GGUF file of a registry model; skips the test when it is not installed."""
    try:
        return gguf_file(name)
    except ModelError as error:
        copy = Path(_PRE_REGISTRY_COPIES.get(name, "/nonexistent"))
        if copy.exists():
            return copy
        pytest.skip(str(error))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama.cpp server exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"llama.cpp server at {url} not ready after {READY_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def llama_server() -> Iterator[Callable[[Path], str]]:
    """A factory: ``llama_server(gguf_path)`` returns the ``/v1`` base URL of a llama.cpp
    server for that file, started on a free port the first time it is asked for (one server
    per file for the session) and killed at the end of the session.

    Servers run single-threaded (the test machines are small and shared), evaluate every
    prompt from scratch (see ``llama_server.py``) and do not cut streams short when another
    request arrives.
    """
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    servers: dict[Path, str] = {}
    processes: list[subprocess.Popen] = []
    logs = tempfile.TemporaryDirectory(prefix="towline-llama-")

    def start(gguf: Path) -> str:
        gguf = Path(gguf).resolve()
        if gguf not in servers:
            port = free_port()
            log = Path(logs.name) / f"{gguf.stem}-{port}.log"
            command = [sys.executable, str(SERVER_SCRIPT), "--model", str(gguf),
                       "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
                       "--n_threads", "1", "--n_threads_batch", "1",
                       "--interrupt_requests", "False", "--verbose", "False"]
            with log.open("wb") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            processes.append(process)
            url = f"http://127.0.0.1:{port}/v1"
            _wait_until_ready(url, process, log)
            servers[gguf] = url
        return servers[gguf]

    yield start
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    logs.cleanup()


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """SmolLM2-135M-Instruct: a ChatML chat model without a BOS token."""
    return registry_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """gemma-3-270m: a base model with a BOS token."""
    return registry_gguf("gemma-3-270m")


@pytest.fixture(scope="session")
def smol_url(llama_server: Callable[[Path], str], smol_gguf: Path) -> str:
    return llama_server(smol_gguf)


@pytest.fixture(scope="session")
def gemma_url(llama_server: Callable[[Path], str], gemma_gguf: Path) -> str:
    return llama_server(gemma_gguf)
