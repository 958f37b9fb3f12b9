"""A llama.cpp server that tests kill in the middle of an answer.

Run as a script, it is ``llama_server.py``'s server (every prompt evaluated from scratch) that
also appends one line to the file ``$TOWLINE_TEST_PROGRESS`` for each token it generates, so
a test can tell that an answer is under way and kill the server then.
:func:`killable_server` starts one on a free port.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_server


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
    own = Path(tempfile.mkdtemp(prefix="server-", dir=folder))
    progress = own / "progress"
    process, url = llama_server.start(gguf, own / "server.log", script=Path(__file__),
                                      env={"TOWLINE_TEST_PROGRESS": str(progress)})
    server = KillableServer(url, process, progress)
    try:
        yield server
    finally:
        server.kill()


def _main() -> None:
    import llama_cpp
    from llama_cpp.server.__main__ import main

    llama_server.evaluate_from_scratch()
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
