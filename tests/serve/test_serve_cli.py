"""``towline serve`` as a user starts it: what to serve (``--model``, ``--compose``,
``--config``), mistakes reported before any model loads, and a real process that drains its
requests on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from towline.cli import app
from towline.serve.config import ConfigError, ServeConfig, open_all, parse_compose, read_config

START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_base) -> Path:
    """The tiny base model saved as a model directory, as a user would serve one."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_base.model.save_pretrained(path)
    tiny_base.tokenizer.save_pretrained(path)
    return path


# -- reading what to serve -------------------------------------------------------------------

def test_compose_values_may_be_quoted_and_hold_commas():
    name, method, options = parse_compose(
        " judged = nudging( base = /m/a.gguf , guide_template='{% for m in messages %}{{ m.content }},{% endfor %}' )")
    assert (name, method) == ("judged", "nudging")
    assert options == {"base": "/m/a.gguf", "guide_template": "{% for m in messages %}{{ m.content }},{% endfor %}"}
    assert parse_compose("plain=base-only") == ("plain", "base-only", {})


@pytest.mark.parametrize(("text", "message"), [
    ("aligned", "write NAME=METHOD(key=value, ...)"),
    ("aligned=nudging(gamma)", "'gamma' is not key=value"),
    ("aligned=nudging(gamma=0.1, gamma=0.2)", "gamma is given twice"),
    ("aligned=nudging(guide='unclosed)", "a quote is not closed"),
])
def test_malformed_compose_says_how_to_write_it(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_compose(text)


def test_config_file_and_one_load_per_model(tmp_path, tiny_dir):
    config_file = tmp_path / "serve.toml"
    config_file.write_text(f'''
models = {{ tiny = "{tiny_dir}" }}

[compose.aligned]
method = "nudging"
base = "tiny"
guide = "{tiny_dir}"
gamma = 0.3
guide_temperature = 0.5
''')
    config = ServeConfig()
    read_config(config_file, config)
    assert config.models == {"tiny": str(tiny_dir)}
    opened = open_all(config)
    try:
        served = opened.models["tiny"]
        composite = opened.composites["aligned"]
        # "tiny" (a served name) and the directory (its spec) are the one loaded model.
        assert composite.participants["base"].model is served and composite.participants["guide"].model is served
        assert composite.method.gamma == 0.3 and composite.participants["guide"].sampling.temperature == 0.5
        assert composite.participants["base"].sampling.temperature == 0.0
    finally:
        opened.close()


@pytest.mark.parametrize(("content", "message"), [
    ("models = 3", "models must be a list of model specs"),
    ("[server]\nport = 1", "unknown section(s) server"),
    ("[compose.a]\nbase = 'x'", "give the method"),
    ("[compose.a]\nmethod = 'nudging'\ngamma = { x = 1 }", "must be a number, a string"),
    ("models = [", "not valid TOML"),
])
def test_bad_config_files_are_explained(tmp_path, content, message):
    path = tmp_path / "serve.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(path, ServeConfig())


@pytest.mark.parametrize(("args", "message"), [
    ([], "nothing to serve"),
    (["--compose", "aligned=nudging(base=/nowhere/a.gguf, gamma=2)"], "composite 'aligned': gamma: must be between 0 and 1"),
    (["--compose", "aligned=nudging(gama=0.3)"], "did you mean --gamma?"),
    (["--compose", "aligned=nudging(guide_template=chatmll)"], "unknown template 'chatmll'"),
    (["--compose", "aligned=nudging(temperature=warm)"], "temperature: must be a number"),
    (["--compose", "aligned=judging(base=x)"], "unknown method 'judging'"),
    (["--model", "openai:m@http://127.0.0.1:1/v1"], "serves local weights as themselves"),
    (["--model", "a=x", "--model", "a=y"], "the name 'a' is served twice"),
    (["--config", "/nowhere/serve.toml"], "cannot read it"),
    (["--model", "x", "--port", "70000"], "--port must be between 0 and 65535"),
])
def test_serve_refuses_mistakes_before_loading_anything(args, message):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


# -- a real server process ---------------------------------------------------------------------

def test_sigterm_lets_the_answer_in_flight_finish_then_exits(tiny_dir, tmp_path, tiny_base):
    budget = 400
    (expected,) = tiny_base.complete(["Hi"], max_tokens=budget)
    log = tmp_path / "serve.log"
    compose = f"aligned=nudging(base=tiny, guide={tiny_dir}, gamma=0.4)"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "towline.cli", "serve", "--model", f"tiny={tiny_dir}", "--compose", compose,
             "--port", "0"], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = _wait_for_url(process, log)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny", "aligned"]
        chunks: list[dict] = []
        first = threading.Event()

        def read_stream() -> None:
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": budget, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(60), log.read_text()
        process.send_signal(signal.SIGTERM)
        received_at_signal = len(chunks)
        reader.join(120)
        # Drained, it ends by the signal it got (uvicorn re-raises it), as process managers expect.
        assert process.wait(60) == -signal.SIGTERM, log.read_text()
        assert "Waiting for connections to close" in log.read_text()
        # The answer in flight was still being written, and it came whole.
        assert received_at_signal < len(chunks) - 2
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected.text
        assert chunks[-1]["usage"]["completion_tokens"] == len(expected.steps)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if process.poll() is None:
            process.kill()


def _wait_for_url(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if match := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text()):
            return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"towline serve did not start:\n{log.read_text()[-3000:]}")
