"""A fault-injecting HTTP proxy on loopback, in front of the tests' moto S3 server.

Clients (s3fs/botocore, pointed at it with ``storage.endpoint_url``) talk to it as to S3; it
forwards each request to the real server and, at a configured rate, answers instead with what a
struggling store does: ``503 SlowDown``, a dropped connection (a TCP reset, before or after the
request reached the store), or a slow answer. During an *outage* every request fails (a dropped
connection or a 503). Nothing inside ``restorer`` is patched: the faults cross a real socket.

It is bounded: it listens on 127.0.0.1 only, injects at most ``max_faults`` faults, an outage
lasts the seconds it is given, and it stops with its ``with`` block.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
              "upgrade", "trailer"}


@dataclass
class FaultCounts:
    requests: int = 0
    slow_down: int = 0  # 503 SlowDown answered instead of the store
    dropped_before: int = 0  # connection reset before the request reached the store
    dropped_after: int = 0  # the store did the request; its answer was lost
    slow: int = 0  # answered after a delay
    outage: int = 0  # failed because an outage was on
    by_method: dict[str, int] = field(default_factory=dict)

    @property
    def faults(self) -> int:
        return self.slow_down + self.dropped_before + self.dropped_after + self.slow + self.outage


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.1) as proxy:`` then point clients at ``proxy.url``.

    ``rate``: the share of requests that get a fault (one of 503, drop before, drop after,
    slow, equally likely); ``slow_seconds``: the delay of a slow answer; ``seed``: the faults'
    random draw; ``max_faults``: no fault after this many (outages included).
    """

    def __init__(self, upstream: str, rate: float = 0.1, slow_seconds: float = 2.0,
                 seed: int = 0, max_faults: int = 100_000):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate, self.slow_seconds, self.max_faults = rate, slow_seconds, max_faults
        self.counts = FaultCounts()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._outage_until = 0.0
        self._outage_fates: tuple[str, ...] = ("outage-503", "outage-drop")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                proxy._relay(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def outage(self, seconds: float, fates: tuple[str, ...] = ("outage-503", "outage-drop")
               ) -> None:
        """Fail every request from now for ``seconds``, each with one of ``fates`` (a 503,
        a dropped connection)."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_fates = fates

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    def _draw(self, method: str) -> str:
        """The fate of one request: "", "outage-503", "outage-drop", "503", "drop-before",
        "drop-after" or "slow"."""
        with self._lock:
            self.counts.requests += 1
            self.counts.by_method[method] = self.counts.by_method.get(method, 0) + 1
            if self.counts.faults >= self.max_faults:
                return ""
            if time.monotonic() < self._outage_until:
                self.counts.outage += 1
                return self._random.choice(self._outage_fates)
            if self._random.random() >= self.rate:
                return ""
            fate = self._random.choice(("503", "drop-before", "drop-after", "slow"))
            if fate == "503":
                self.counts.slow_down += 1
            elif fate == "drop-before":
                self.counts.dropped_before += 1
            elif fate == "drop-after":
                self.counts.dropped_after += 1
            else:
                self.counts.slow += 1
            return fate

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        fate = self._draw(handler.command)
        if fate in ("drop-before", "outage-drop"):
            return _reset(handler)
        if fate in ("503", "outage-503"):
            handler.send_response(503, "Slow Down")
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(SLOW_DOWN)))
            handler.end_headers()
            handler.wfile.write(SLOW_DOWN)
            return
        if fate == "slow":
            time.sleep(self.slow_seconds)
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fate == "drop-after":
            return _reset(handler)
        handler.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Drop the connection with a TCP reset, answering nothing."""
    handler.close_connection = True
    with_reset = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, with_reset)
        os.close(handler.connection.detach())  # now, whatever file objects still refer to it
    except OSError:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a reset connection's handler fails on its way out; that is the point
