"""Load on ``towline serve`` over loopback: requests/s, latency and errors at 1, 4 and 16
concurrent clients. Prints one JSON object.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--requests 32] [--max-tokens 32]

Starts ``towline serve --model MODEL`` on 127.0.0.1 (a free port), then for each level of
concurrency sends ``--requests`` chat completions with distinct prompts (greedy,
``--max-tokens`` each) from that many client threads, stopping early at ``--max-seconds``
per level. The server answers one request at a time per model, so throughput should stay
flat as clients are added while latency grows with the queue. First, the same requests run
in-process on the local model (``local_seconds_per_request``): the 1-client latency less
that is what serving adds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

LEVELS = (1, 4, 16)
START_TIMEOUT_S = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32, help="requests per level of concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=180, help="time limit per level")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    report: dict = {"model": args.model, "requests_per_level": args.requests, "max_tokens": args.max_tokens,
                    "server_threads": args.threads, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                    "local_seconds_per_request": _local_baseline(args)}
    with tempfile.TemporaryDirectory() as scratch, _server(args.model, args.threads, Path(scratch)) as url:
        _one(url, args.model, "warm-up", args.max_tokens)
        report["levels"] = {str(c): _level(url, args, c) for c in LEVELS}
        report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report))


def _question(i: int, clients: int) -> str:
    return f"Request {i} of {clients}-client load: name a colour and a fruit."


def _local_baseline(args: argparse.Namespace, count: int = 4) -> float:
    """Median seconds of the 1-client requests decoded in this process, without the server."""
    import torch

    from towline.models.local import LocalModel
    from towline.prompts import PromptRequest, build_prompt

    torch.set_num_threads(args.threads)
    model = LocalModel.load(args.model)
    times = []
    for i in range(count + 1):  # the first one warms up
        prompt = build_prompt(PromptRequest(question=_question(i, 1)), chat=True, model_template=model.chat_template)
        started = time.perf_counter()
        model.complete([prompt.text], max_tokens=args.max_tokens, stop=[prompt.end_of_turn])
        times.append(time.perf_counter() - started)
    return round(statistics.median(times[1:]), 3)


def _level(url: str, args: argparse.Namespace, clients: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def client(i: int) -> None:
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        try:
            count = _one(url, args.model, _question(i, clients), args.max_tokens)
        except (httpx.HTTPError, ValueError) as error:
            with lock:
                errors.append(f"{type(error).__name__}: {error}"[:200])
            return
        with lock:
            latencies.append(time.perf_counter() - started)
            tokens.append(count)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(args.requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "completed": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 2),
        "requests_per_second": round(len(latencies) / wall, 3),
        "output_tokens_per_second": round(sum(tokens) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None,
    }


def _one(url: str, model: str, question: str, max_tokens: int) -> int:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0})
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {response.text[:150]}")
    return response.json()["usage"]["completion_tokens"]


class _server:
    """``towline serve --model MODEL`` on loopback for the length of a ``with`` block."""

    def __init__(self, model: str, threads: int, scratch: Path) -> None:
        self.command = [sys.executable, "-m", "towline.cli", "serve", "--model", model, "--host", "127.0.0.1",
                        "--port", "0"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = scratch / "serve.log"

    def __enter__(self) -> str:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log.read_text()):
                return match.group(1)
            time.sleep(0.2)
        self.process.kill()
        raise SystemExit(f"the server did not start:\n{self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


if __name__ == "__main__":
    main()
