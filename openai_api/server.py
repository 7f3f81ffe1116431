"""Running the app: `serve` in the foreground (returns on SIGINT / SIGTERM), `running_server` in a
background thread (tests, tools)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from openai_api.app import create_app
from openai_api.settings import Settings

GRACEFUL_SHUTDOWN = 5.0  # seconds for open requests on shutdown; then their streams (and Triton calls) are cancelled


def serve(settings: Settings, backend=None, log_level: str = "info") -> None:
    """Serves until SIGINT or SIGTERM (uvicorn's handlers), then returns."""
    config = uvicorn.Config(create_app(settings, backend), host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
    uvicorn.Server(config).run()


@contextlib.contextmanager
def running_server(settings: Settings, backend=None, log_level: str = "warning", startup_timeout: float = 30) -> Iterator[str]:
    """The server in a thread; yields its base URL (http://host:port). settings.port 0 picks a free port."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    config = uvicorn.Config(create_app(settings, backend), log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="openai_api", daemon=True)
    thread.start()
    try:
        for _ in range(int(startup_timeout / 0.02)):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError("the OpenAI API server did not start")
        host, port = sock.getsockname()[:2]
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
