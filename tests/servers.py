"""Real servers on 127.0.0.1 for the download tests: an HTTP server with fault paths, and a
moto S3 server. Both listen on ephemeral ports and stop when their context ends.

Kept free of torch imports at module level: spawned worker processes import this module.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Upper bound for any wait inside a server handler, so a test can never hang on one.
HANDLER_WAIT_S = 10.0


@dataclass
class Route:
    """What the server does for one path.

    kind:
        "ok": 200, Content-Length, the body.
        "nolength": 200 without Content-Length; the connection close ends the body.
        "short": announces the full length, sends half the body, closes.
        "drop": closes the connection without answering.
        "status": answers `status` with a small HTML page (and `headers`).
        "flaky": answers `status` for the first `fail_times` requests, then as "ok".
        "slow": as "ok", in `chunks` pieces `delay_s` apart.
        "hang_once": the first request gets the headers and half the body, then waits for
            `release` (or HANDLER_WAIT_S) and closes; later requests as "ok".
    """

    body: bytes = b""
    kind: str = "ok"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    fail_times: int = 0
    chunks: int = 4
    delay_s: float = 0.05
    half_sent: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class CheckpointServer:
    """A threaded `http.server` on 127.0.0.1 serving `Route`s, counting requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes = b"", kind: str = "ok", **options: Any) -> str:
        """Serves `path`; returns its URL."""
        self.routes[path] = Route(body=body, kind=kind, **options)
        return self.url(path)

    def start(self) -> CheckpointServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        for route in self.routes.values():
            route.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=HANDLER_WAIT_S)

    def _count(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        nth = self._count(path)
        route = self.routes.get(path)
        if route is None:
            return self._status(handler, 404, {})
        kind = route.kind
        if kind == "flaky":
            kind = "status" if nth <= route.fail_times else "ok"
        if kind == "hang_once":
            kind = "hang" if nth == 1 else "ok"
        body = route.body
        if kind == "status":
            return self._status(handler, route.status, route.headers)
        if kind == "drop":
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        handler.send_response(200)
        handler.send_header(
            "Content-Type", route.headers.get("Content-Type", "application/octet-stream")
        )
        if kind != "nolength":
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        out = handler.wfile
        try:
            if kind in ("ok", "nolength"):
                out.write(body)
            elif kind == "short":
                out.write(body[: len(body) // 2])
            elif kind == "slow":
                step = max(1, -(-len(body) // route.chunks))
                for start in range(0, len(body), step):
                    out.write(body[start : start + step])
                    out.flush()
                    time.sleep(route.delay_s)
            elif kind == "hang":
                out.write(body[: len(body) // 2])
                out.flush()
                route.half_sent.set()
                route.release.wait(HANDLER_WAIT_S)
            out.flush()
        except OSError:
            pass  # the client went away (killed download): nothing to do
        handler.close_connection = True
        return None

    @staticmethod
    def _status(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        page = f"<html><body>error {status}</body></html>".encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(page)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(page)
        handler.close_connection = True


@contextlib.contextmanager
def checkpoint_server() -> Iterator[CheckpointServer]:
    server = CheckpointServer().start()
    try:
        yield server
    finally:
        server.stop()


def checkpoint_bytes(seed: int = 0, **extra: Any) -> bytes:
    """A small real torch checkpoint (`torch.save` zip format)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {"weight": torch.randn(4, 3, generator=generator), "bias": torch.zeros(4)}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, **extra}, buffer)
    return buffer.getvalue()


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def download_worker(url: str, home: str, start: Any, results: Any) -> None:
    """A spawned process: waits for `start`, downloads `url` into the cache at `home`."""
    os.environ["CKPTMAP_HOME"] = home
    from ckptmap.cache import cached_download

    start.wait(HANDLER_WAIT_S)
    try:
        path = cached_download(url, retries=0)
        results.put(("ok", str(path)))
    except Exception as exc:  # reported to the test
        results.put(("error", f"{type(exc).__name__}: {exc}"))
