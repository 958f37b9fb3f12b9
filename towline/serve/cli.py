"""``towline serve``: the command line of the server (see ``docs/serving.md``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from towline.models.base import ModelError

err = Console(stderr=True, highlight=False, soft_wrap=True)


def serve_command(
    model: Annotated[list[str], typer.Option(
        "--model", help="Serve a model as itself: [NAME=]SPEC (a registry name, .gguf file or model directory). "
                        "Repeatable.")] = [],  # noqa: B006  (typer reads the default, never mutates it)
    compose: Annotated[list[str], typer.Option(
        "--compose", help="Serve an aligned composite: NAME=METHOD(role=SPEC, option=value, ...), e.g. "
                          "\"aligned=nudging(base=gemma-3-270m, guide=smollm2-135m-instruct, gamma=0.4)\". "
                          "Repeatable.")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="A TOML file listing models and compose tables (see docs/serving.md).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="TOWLINE_API_KEY", help="Require 'Authorization: Bearer KEY' (or set $TOWLINE_API_KEY).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body taken.")] = 4 << 20,
    max_pending: Annotated[int, typer.Option(help="Most requests in flight; more get HTTP 503.")] = 64,
    drain_seconds: Annotated[float, typer.Option(
        help="On SIGTERM/Ctrl-C, how long requests in flight may finish before they are cancelled.")] = 60,
) -> None:
    """Serve models and aligned composites over an OpenAI-compatible API (vLLM's routes)."""
    from towline.serve import run
    from towline.serve.app import create_app
    from towline.serve.config import ConfigError, ServeConfig, open_all, parse_compose, parse_model, read_config

    if not 0 <= port < 65536:
        _fail(f"--port must be between 0 and 65535, got {port}")
    if max_body_bytes < 1024 or max_pending < 1:
        _fail("--max-body-bytes must be at least 1024 and --max-pending at least 1")
    try:
        wanted = ServeConfig()
        for text in model:
            wanted.add_model(*parse_model(text), where=f"--model {text}")
        for text in compose:
            name, method, options = parse_compose(text)
            wanted.add_composite(name, method, options, where=f"--compose {text}")
        if config is not None:
            read_config(config, wanted)
        _quiet_libraries()
        opened = open_all(wanted, log=lambda message: err.print(message, markup=False))
    except (ConfigError, ModelError) as error:
        _fail(str(error))
    try:
        app = create_app(opened.models, opened.composites, api_key=api_key, max_body_bytes=max_body_bytes,
                         max_pending=max_pending)
        names = [*opened.models, *opened.composites]
        where = f" at http://{host}:{port}/v1" if port else ""  # for port 0, uvicorn's next line names the port
        err.print(f"serving {', '.join(names)}{where}{' (API key required)' if api_key else ''}", markup=False)
        if not api_key and not _is_loopback(host):
            err.print(Text.assemble(("warning:", "yellow"), f" listening on {host} without --api-key: anyone who "
                                    "can reach this port can use the models"))
        run(app, host=host, port=port, drain_seconds=drain_seconds)
    finally:
        opened.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _fail(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
