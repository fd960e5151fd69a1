"""A fault-injecting HTTP proxy on the loopback, in front of the test S3 server (moto).

Each request a client sends through ``FaultProxy.endpoint`` is, at a seeded rate per kind:

- ``reset``: the connection closed with a TCP reset before the request is forwarded (the
  server never sees it), as a refused or reset connection;
- ``drop``: forwarded (the server acts on it), then the connection closed halfway through the
  answer's headers, as a connection lost mid-exchange;
- ``500`` / ``503``: answered ``500 InternalError`` / ``503 SlowDown`` with S3's XML error
  body, not forwarded;
- ``truncate``: forwarded, the answer's headers sent whole (its Content-Length too) but only
  half of the body, then the connection closed;
- ``slow``: forwarded, the body sent in small pieces with pauses (no error).

Otherwise the request and its answer pass unchanged. The proxy listens on 127.0.0.1 and talks
only to the upstream it was given (also on 127.0.0.1): nothing reaches beyond the loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("reset", "drop", "500", "503", "truncate", "slow")
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
)
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


class FaultProxy:
    """A threaded proxy to ``upstream`` (``http://127.0.0.1:PORT``) injecting faults.

    Args:
        upstream: the server's endpoint URL (loopback only).
        rates: probability per request of each kind in ``KINDS`` (missing kinds: 0); may be
            changed while running (``set_rates``).
        seed: seeds the draws (the threads' interleaving still varies between runs).
    """

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0):
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy forwards to the loopback only, not {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()  # kind → faults injected
        self.requests = 0
        self.fail_after: int | None = None  # from this many requests on: every one a 503
        self.set_rates(rates or {})
        self.server = _Server(("127.0.0.1", 0), _handler_for(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def set_rates(self, rates: dict[str, float]) -> None:
        unknown = set(rates) - set(KINDS)
        if unknown or sum(rates.values()) > 1:
            raise ValueError(f"fault rates: unknown kinds {unknown} or a sum above 1: {rates}")
        with self.lock:
            self.rates = {kind: float(rates.get(kind, 0.0)) for kind in KINDS}

    def draw(self) -> str | None:
        """The fault for the next request, or None."""
        with self.lock:
            self.requests += 1
            if self.fail_after is not None and self.requests > self.fail_after:
                self.injected["503"] += 1
                return "503"
            x, edge = self.random.random(), 0.0
            for kind, rate in self.rates.items():
                edge += rate
                if x < edge:
                    self.injected[kind] += 1
                    return kind
        return None

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (its timeout, or a fault it was dealt): nothing to log


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real S3 endpoint
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            for attempt in range(2):  # a kept-alive upstream connection may have gone stale
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = self.upstream.getresponse()
                    data = answer.read()
                    return answer.status, answer.reason, answer.getheaders(), data
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _do(self) -> None:
            fault = proxy.draw()
            if fault == "reset":
                _reset(self.connection)
                self.close_connection = True
                return
            body = self._body()
            if fault in _ERRORS:
                status, code, message = _ERRORS[fault]
                data = _ERROR_BODY.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            status, reason, headers, data = self._forward(body)
            head = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
            head += [f"{k}: {v}\r\n".encode() for k, v in headers if k.lower() not in _HOP]
            if not any(k.lower() == "content-length" for k, _ in headers):
                head.append(f"Content-Length: {len(data)}\r\n".encode())
            raw = b"".join(head) + b"\r\n"
            if fault == "drop":
                self.wfile.write(raw[: len(raw) // 2])
                self.wfile.flush()
                _reset(self.connection)
                self.close_connection = True
                return
            self.wfile.write(raw)
            if fault == "truncate" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                _reset(self.connection)
                self.close_connection = True
                return
            if fault == "slow":
                piece = max(1, len(data) // 8)
                for start in range(0, len(data), piece):
                    self.wfile.write(data[start : start + piece])
                    self.wfile.flush()
                    time.sleep(0.02)
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _do

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self.upstream is not None:
                    self.upstream.close()

    return Handler
