"""Faults on loopback, for the retry and alert tests: a proxy in front of an HTTP service (the Moto
S3 server) that answers 503 to the first k requests, an HTTP server that always answers 503, a
port nothing listens on, a webhook receiver that records what it is sent, and a receiver of alias
events that checks their signatures and answers what a test scripts."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


@dataclass
class Proxy:
    url: str
    fail_first: int | None  # None: every request fails
    requests: list[str] = field(default_factory=list)
    failed: int = 0


@contextlib.contextmanager
def failing_proxy(upstream: str, fail_first: int | None) -> Iterator[Proxy]:
    """A loopback HTTP proxy to ``upstream`` whose first ``fail_first`` requests (all, for None)
    get S3's "503 SlowDown" instead of reaching it."""
    target = urlsplit(upstream)
    lock = threading.Lock()
    state = Proxy(url="", fail_first=fail_first)

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                state.requests.append(f"{self.command} {self.path}")
                fail = state.fail_first is None or state.failed < state.fail_first
                state.failed += fail
            if fail:
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN)
                return
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as url:
        state.url = url
        yield state


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a free loopback port in a thread until the block ends; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def always_503() -> Iterator[str]:
    """A loopback HTTP server that answers every request 503 Service Unavailable; yields its URL."""
    with failing_proxy("http://127.0.0.1:9", fail_first=None) as proxy:  # never forwards
        yield proxy.url


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Receiver:
    url: str
    messages: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """A loopback HTTP server that records the JSON body of every POST (a Slack-style webhook)."""
    state = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.messages.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as url:
        state.url = f"{url}/hooks/finetune"
        yield state


@dataclass
class SignedReceiver:
    """What a receiver of alias events got: every request's raw body and headers, and which it accepted."""

    url: str
    secret: str
    answers: list[int]  # the status of each request in turn; 200 once they run out
    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)

    def verified(self, raw: bytes, header: str) -> bool:
        """What a receiver does first: the HMAC-SHA256 of the raw body under the shared secret."""
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, header)


@contextlib.contextmanager
def signed_receiver(secret: str, answers: list[int] | None = None) -> Iterator[SignedReceiver]:
    """A loopback receiver that answers ``answers`` in turn, then accepts an event only when its
    signature verifies (401 otherwise)."""
    state = SignedReceiver(url="", secret=secret, answers=list(answers or []))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append((raw, dict(self.headers)))
            status = state.answers.pop(0) if state.answers else 200
            if status == 200 and not state.verified(raw, self.headers.get("X-Finetune-Signature", "")):
                status = 401
            if status == 200:
                state.accepted.append(json.loads(raw))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as url:
        state.url = f"{url}/hooks/finetune"
        yield state
