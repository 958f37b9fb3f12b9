"""A llama.cpp server that tests kill in the middle of an answer.

Run as a script, it is ``llama_server.py``'s server (every prompt evaluated from scratch) that
also appends one line to the file ``$TOWLINE_TEST_PROGRESS`` for each token it generates, so
a test can tell that an answer is under way and kill the server then.
:func:`killable_server` starts one on a free port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 90


@dataclass
class KillableServer:
    url: str
    process: subprocess.Popen
    progress: Path

    def tokens(self) -> int:
        """Tokens generated so far, over all requests."""
        return len(self.progress.read_text().splitlines()) if self.progress.exists() else 0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def kill_after(self, tokens: int, timeout: float = 300) -> threading.Thread:
        """Kill the server, from a background thread, once it has generated ``tokens`` tokens."""
        def watch() -> None:
            deadline = time.monotonic() + timeout
            while self.tokens() < tokens and time.monotonic() < deadline and self.process.poll() is None:
                time.sleep(0.02)
            self.kill()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread


@contextlib.contextmanager
def killable_server(gguf: Path, folder: Path) -> Iterator[KillableServer]:
    """A server for ``gguf`` with its log and progress file in ``folder``; killed on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    progress = folder / f"progress-{port}"
    log = folder / f"server-{port}.log"
    command = [sys.executable, __file__, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
               "--interrupt_requests", "False", "--verbose", "False"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TOWLINE_TEST_PROGRESS": str(progress)})
    server = KillableServer(f"http://127.0.0.1:{port}/v1", process, progress)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server did not start:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        yield server
    finally:
        server.kill()


def _main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import llama_cpp
    import llama_server  # noqa: F401  (patches generate to evaluate every prompt from scratch)
    from llama_cpp.server.__main__ import main

    from_scratch = llama_cpp.Llama.generate

    def generate(self, *args, **kwargs):
        with open(os.environ["TOWLINE_TEST_PROGRESS"], "a") as progress:
            for token in from_scratch(self, *args, **kwargs):
                progress.write("token\n")
                progress.flush()
                yield token

    llama_cpp.Llama.generate = generate
    sys.exit(main())


if __name__ == "__main__":
    _main()
