"""``towline serve``: an OpenAI-compatible server (vLLM's routes and response shapes) for
local models and for aligned composites (a method bound to its models, under a virtual
model name).

>>> import towline
>>> from towline.serve import create_app, run
>>> aligned = towline.compose(method="nudging", base=base, guide=guide, gamma=0.4)   # doctest: +SKIP
>>> app = create_app({"smol": guide}, {"aligned": aligned})                         # doctest: +SKIP
>>> run(app, port=8123)                                                            # doctest: +SKIP

See ``docs/serving.md``.
"""

from __future__ import annotations

from typing import Any

DRAIN_SECONDS = 60
"""How long SIGTERM waits for requests in flight before cancelling them."""


def create_app(*args: Any, **kwargs: Any):
    """See :func:`towline.serve.app.create_app` (imported on use: FastAPI loads in ~0.5 s)."""
    from towline.serve.app import create_app as create

    return create(*args, **kwargs)


def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, drain_seconds: float = DRAIN_SECONDS,
        log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM; then stop taking connections, let the
    requests in flight finish (up to ``drain_seconds``, then they are cancelled) and return."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_seconds,
                            access_log=log_level == "debug")
    uvicorn.Server(config).run()


__all__ = ["create_app", "run"]
