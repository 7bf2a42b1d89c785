"""Web servers of the demo: uvicorn on pre-bound loopback sockets, each in a thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["Server", "free_socket"]


def free_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1 (not yet listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class Server:
    """A uvicorn server on pre-bound sockets, in a thread."""

    def __init__(self, app: Any, sockets: list[socket.socket], name: str) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            log_level="error",
            access_log=False,
            # Keep the logging set up by the demo (uvicorn would reconfigure it).
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=1,
            # Many concurrent deliveries arrive at once; keep the backlog generous.
            backlog=1024,
        )
        self.server: uvicorn.Server = uvicorn.Server(config)
        self.sockets = sockets
        self.thread = threading.Thread(target=self._serve, name=f"botkit-demo-{name}", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=self.sockets)
        except BaseException as exc:  # reported by start()
            self.error = exc

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"web server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("web server did not start in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()
