"""Real servers on 127.0.0.1 for the download tests: an HTTP server with fault paths (and,
per route, byte ranges with their own faults), and a moto S3 server. Both listen on ephemeral
ports, count the body bytes they send per path, and stop when their context ends.

Kept free of torch imports at module level: spawned worker processes import this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
        "raw": `body` is the whole response (status line, headers and body) sent as it is,
            then the connection closes: malformed headers, cut chunked bodies, ...

    ranges (for "ok" routes; the others ignore Range headers):
        "none": Range headers are ignored: 200 and the whole body, no Accept-Ranges.
        "bytes": one byte range per request (``bytes=a-b``, ``a-``, ``-n``): 206 with
            Content-Range and Accept-Ranges, 416 when unsatisfiable; several ranges in one
            request get the whole body (200), as servers may do.
        "short": as "bytes", but only half of each range's bytes are sent before closing.
        "shifted": as "bytes", but each range starts one byte later than asked (and says so
            in Content-Range).
    validators: send a strong ETag (from the body's SHA-256) and honour If-Match (412 when
        it does not match). `last_modified`: a Last-Modified value to send, if any.
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
    ranges: str = "none"
    validators: bool = True
    last_modified: str | None = None

    _etag_of: tuple[bytes, str] | None = None

    @property
    def etag(self) -> str:
        """A strong ETag of the body, computed once per body object."""
        if self._etag_of is None or self._etag_of[0] is not self.body:
            self._etag_of = (self.body, '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"')
        return self._etag_of[1]


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive `(first, last)` of a one-range header; None when unsatisfiable.

    Raises:
        ValueError: not a single byte range (the server then sends the whole body).
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        raise ValueError(header)
    if not match.group(1):  # the last n bytes
        n = int(match.group(2))
        return (max(0, size - n), size - 1) if n and size else None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


class CheckpointServer:
    """A threaded `http.server` on 127.0.0.1 serving `Route`s, counting requests per path,
    the body bytes sent per path (`bytes_sent`), and every request's Range header
    (`requests`, as ``(path, range or None)``)."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        #: Every request's path and headers, in arrival order.
        self.received: list[dict[str, str]] = []
        self.hits: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

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

    def _count(self, path: str, range_header: str | None) -> int:
        with self._lock:
            self.hits[path] += 1
            self.requests.append((path, range_header))
            return self.hits[path]

    def reset_counts(self) -> None:
        """Forgets the requests and bytes counted so far."""
        with self._lock:
            self.hits.clear()
            self.bytes_sent.clear()
            self.requests.clear()

    def _send(self, handler: BaseHTTPRequestHandler, path: str, data: bytes | memoryview) -> None:
        # Counted before writing: once the client has the bytes, the count shows them.
        with self._lock:
            self.bytes_sent[path] += len(data)
        handler.wfile.write(data)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        range_header = handler.headers.get("Range")
        with self._lock:
            self.received.append({"path": handler.path, **dict(handler.headers.items())})
        nth = self._count(path, range_header)
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
        if kind == "raw":
            with contextlib.suppress(OSError):
                handler.wfile.write(body)
                handler.wfile.flush()
            handler.close_connection = True
            return None
        if kind == "drop":
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        if kind == "ok" and route.ranges != "none":
            return self._ranged(handler, path, route, range_header)
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
                self._send(handler, path, body)
            elif kind == "short":
                self._send(handler, path, body[: len(body) // 2])
            elif kind == "slow":
                step = max(1, -(-len(body) // route.chunks))
                for start in range(0, len(body), step):
                    self._send(handler, path, body[start : start + step])
                    out.flush()
                    time.sleep(route.delay_s)
            elif kind == "hang":
                self._send(handler, path, body[: len(body) // 2])
                out.flush()
                route.half_sent.set()
                route.release.wait(HANDLER_WAIT_S)
            out.flush()
        except OSError:
            pass  # the client went away (killed download): nothing to do
        handler.close_connection = True
        return None

    def _ranged(
        self,
        handler: BaseHTTPRequestHandler,
        path: str,
        route: Route,
        range_header: str | None,
    ) -> None:
        """An "ok" route that serves byte ranges (see `Route`)."""
        body = route.body
        size = len(body)
        validators: dict[str, str] = {}
        if route.validators:
            validators["ETag"] = route.etag
        if route.last_modified:
            validators["Last-Modified"] = route.last_modified
        if_match = handler.headers.get("If-Match")
        if route.validators and if_match is not None and if_match.strip() != route.etag:
            return self._status(handler, 412, validators)
        span: tuple[int, int] | None = (0, size - 1) if size else None
        partial = range_header is not None
        if partial:
            try:
                span = _byte_range(range_header, size)
            except ValueError:
                partial = False
                span = (0, size - 1) if size else None
            if partial and span is None:
                return self._status(
                    handler, 416, {"Content-Range": f"bytes */{size}", **validators}
                )
        first, last = span if span is not None else (0, -1)
        if partial and route.ranges == "shifted":
            first, last = min(first + 1, size - 1), min(last + 1, size - 1)
        handler.send_response(206 if partial else 200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(last - first + 1))
        if partial:
            handler.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        for name, value in validators.items():
            handler.send_header(name, value)
        handler.end_headers()
        data = memoryview(body)[first : last + 1]
        if partial and route.ranges == "short":
            data = data[: len(data) // 2]
        try:
            self._send(handler, path, data)
            handler.wfile.flush()
        except OSError:
            pass  # the client went away
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
def checkpoint_server(tls: tuple[str, str] | None = None) -> Iterator[CheckpointServer]:
    """A running `CheckpointServer` (https when `tls` is a (certificate, key) file pair)."""
    server = CheckpointServer(tls).start()
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


class ByteCounter:
    """Counts, per request path (``/bucket/key`` for S3), the requests and the body bytes a
    WSGI app sends for GET requests, and keeps each GET's Range header."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.bytes_sent: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str | None]] = []

    def reset(self) -> None:
        """Forgets what was counted so far."""
        with self._lock:
            self.bytes_sent.clear()
            self.hits.clear()
            self.requests.clear()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "GET":
            return self._app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        with self._lock:
            self.hits[path] += 1
            self.requests.append((path, environ.get("HTTP_RANGE")))
        return self._counted(path, self._app(environ, start_response))

    def _counted(self, path: str, body: Any) -> Iterator[bytes]:
        try:
            for chunk in body:
                with self._lock:
                    self.bytes_sent[path] += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


@contextlib.contextmanager
def counting_moto_s3_server() -> Iterator[tuple[str, ByteCounter]]:
    """A moto S3 server on 127.0.0.1 whose GET bodies are counted at the server; yields its
    endpoint URL and the `ByteCounter`."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counter = ByteCounter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}", counter
    finally:
        server.shutdown()
        thread.join(timeout=HANDLER_WAIT_S)


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


#: The subtree a prefix load takes from `random_checkpoint` files: 10% of the bytes, in two
#: dtypes (so its tensors lie in two runs of the file: safetensors orders data by dtype).
SUBTREE = "neck"


def _random(shape: tuple[int, ...], dtype: Any, generator: Any) -> Any:
    """Random finite values, cheaply: random integer bits below the exponent's all-ones
    pattern, viewed as floats (no NaN, so `torch.equal` compares them)."""
    import torch

    if dtype == torch.float32:
        bits = torch.randint(0, 0x7F000000, shape, dtype=torch.int32, generator=generator)
        return bits.view(torch.float32)
    if dtype == torch.bfloat16:
        bits = torch.randint(0, 0x7F00, shape, dtype=torch.int16, generator=generator)
        return bits.view(torch.bfloat16)
    return torch.randint(-1000, 1000, shape, dtype=dtype, generator=generator)


def random_state(total_bytes: int, seed: int = 0) -> dict[str, Any]:
    """A state dict of about `total_bytes` of random data: ``backbone`` (90%: 36 float32
    weights with int64 counters), ``neck`` (`SUBTREE`, 10%: float32 and bfloat16) and a small
    ``head``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    row = 1024
    backbone = max(1, int(total_bytes * 0.9) // 36 // (4 * row))
    for i in range(36):
        state[f"backbone.blocks.{i}.weight"] = _random((backbone, row), torch.float32, generator)
        state[f"backbone.blocks.{i}.steps"] = _random((3,), torch.int64, generator)
    neck = max(1, int(total_bytes * 0.1) // 4 // (4 * row))
    for i in range(2):
        state[f"{SUBTREE}.fpn.{i}.weight"] = _random((neck, row), torch.float32, generator)
        state[f"{SUBTREE}.lateral.{i}.weight"] = _random((2 * neck, row), torch.bfloat16, generator)
    state["head.fc.weight"] = _random((10, row), torch.float32, generator)
    state["head.fc.bias"] = _random((10,), torch.float32, generator)
    return state


def random_checkpoint(path: str | os.PathLike[str], total_bytes: int, seed: int = 0) -> bytes:
    """Writes `random_state` with safetensors' own writer; returns the header bytes (the
    8-byte length and the JSON), which is all a header-only read may transfer."""
    from safetensors.torch import save_file

    state = random_state(total_bytes, seed)
    save_file(state, os.fspath(path), metadata={"format": "pt", "seed": str(seed)})
    del state
    with open(path, "rb") as f:
        prefix = f.read(8)
        return prefix + f.read(int.from_bytes(prefix, "little"))


def self_signed_certificate(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in `directory`.

    Trust it in a client by pointing ``SSL_CERT_FILE`` at the certificate.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def cache_entries(home: os.PathLike[str] | str) -> list[Path]:
    """The download cache's entries under `home` (each entry's ``.sha256`` manifest aside)."""
    root = Path(home)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".sha256")
