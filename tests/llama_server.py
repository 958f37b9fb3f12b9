"""Run llama-cpp-python's OpenAI-compatible server with prefix-cache reuse turned off.

The server keeps the previous request's KV cache and re-evaluates only the new suffix of a
prompt. Logits computed that way differ from a fresh evaluation in the last bits, which is
enough to flip near-ties between the top tokens from one request to the next. Resetting the
model before every generation makes each request evaluate its whole prompt, so the same
request always gets the same answer.

Usage: ``python llama_server.py --model FILE --host 127.0.0.1 --port PORT [server flags]``
(the flags of ``python -m llama_cpp.server``); :func:`start` launches one on a free port.

With ``$TOWLINE_GENERATED_LOG`` set to a file, every generation appends a line with the number
of tokens the model generated for it (one forward pass each), so that a benchmark can read
what a client's requests really cost, also for streams the client stopped reading early.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 90


def start(gguf: Path, log: Path, *, script: Path = Path(__file__), env: dict[str, str] | None = None,
          ready_timeout: float = READY_TIMEOUT_S) -> tuple[subprocess.Popen, str]:
    """Start ``script`` (this server, or one that wraps it) for ``gguf`` on a free port, one
    thread, its output in ``log``; return its process and ``/v1`` URL once it answers. Raises
    RuntimeError with the end of the log when it exits or is not ready in ``ready_timeout`` s."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(script), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
               "--interrupt_requests", "False", "--verbose", "False"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"llama.cpp server at {url} not ready after {ready_timeout:g}s:\n"
                               f"{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)


def evaluate_from_scratch() -> None:
    """Make every generation of this process's llama.cpp models start from a reset model
    (and log its token count to ``$TOWLINE_GENERATED_LOG`` where that is set)."""
    import llama_cpp

    generate = llama_cpp.Llama.generate
    log = os.environ.get("TOWLINE_GENERATED_LOG")

    @functools.wraps(generate)
    def from_scratch(self, *args, **kwargs):
        self.reset()
        tokens = generate(self, *args, **kwargs)
        return _logged(tokens, log) if log else tokens

    llama_cpp.Llama.generate = from_scratch


def _logged(tokens, log: str):
    generated = 0
    try:
        for token in tokens:
            generated += 1
            yield token
    finally:
        with open(log, "a") as out:
            out.write(f"{generated}\n")


if __name__ == "__main__":
    evaluate_from_scratch()
    from llama_cpp.server.__main__ import main

    sys.exit(main())
