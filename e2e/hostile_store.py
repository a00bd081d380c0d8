"""A hostile S3 endpoint on loopback, for the tenant-isolation tests: it answers the operator's
requests the way a store a tenant controls could (bodies that never end, errors whose text carries
a secret, `Range` ignored, headers that claim a gigabyte) and counts what it sent. It speaks just
enough of S3's path-style GET for boto3 (it checks no signature)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How much an endless body sends at most, so that a reader without a cap fails the test (by its
# byte count) instead of filling the machine's memory.
ENDLESS_CEILING = 512 * 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Answer:
    """What the store answers for one key: `body` (bytes, sent whole whatever `Range` asks when
    `ignore_range`), or an endless stream of `filler` without Content-Length, or an S3 error."""

    body: bytes = b""
    ignore_range: bool = False
    endless: bool = False
    filler: bytes = b"x"
    error: tuple[int, str, str] | None = None  # HTTP status, S3 code, message


@dataclass
class Tally:
    requests: int = 0
    bytes_sent: int = 0
    paths: list[str] = field(default_factory=list)


class HostileStore:
    """`answers` maps an object path (`/bucket/key`) to its Answer; other paths are NoSuchKey.
    After `deny_after` requests, every request gets `denial` instead (a store that lets the
    operator's own read through, then turns on the pods that load the weights)."""

    def __init__(self, answers: dict[str, Answer], host: str = "127.0.0.1", deny_after: int | None = None,
                 denial: Answer | None = None) -> None:
        self.answers = answers
        self.deny_after = deny_after
        self.denial = denial or Answer(error=(403, "AccessDenied", "Access Denied"))
        self.tally = Tally()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _request(self, path: str) -> Answer:
        """Counts the request; what to answer it."""
        with self._lock:
            self.tally.requests += 1
            self.tally.paths.append(path)
            if self.deny_after is not None and self.tally.requests > self.deny_after:
                return self.denial
        return self.answers.get(path, Answer(error=(404, "NoSuchKey", "no such key")))

    def _sent(self, count: int) -> None:
        with self._lock:
            self.tally.bytes_sent += count

    def _handler(self) -> Callable[..., BaseHTTPRequestHandler]:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                answer = store._request(path)
                if answer.error is not None:
                    status, code, message = answer.error
                    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message><Resource>{path}</Resource></Error>").encode()
                    self._send(status, body, "application/xml", head)
                elif answer.endless:
                    self._endless(answer.filler, head)
                else:
                    self._object(answer, head)

            def _object(self, answer: Answer, head: bool) -> None:
                body, status = answer.body, 200
                wanted = self.headers.get("Range")
                if wanted and not answer.ignore_range and wanted.startswith("bytes="):
                    first, _, last = wanted[len("bytes="):].partition("-")
                    start = int(first)
                    end = min(int(last) if last else len(body) - 1, len(body) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                    self.send_header("Content-Length", str(max(0, end - start + 1)))
                    self.end_headers()
                    if not head:
                        self._write(body[start:end + 1])
                    return
                self._send(status, body, "application/octet-stream", head)

            def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self._write(body)

            def _endless(self, filler: bytes, head: bool) -> None:
                # No Content-Length: a chunked body that only ends when the client hangs up.
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if head:
                    return
                chunk = (filler * (CHUNK // len(filler) + 1))[:CHUNK]
                framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                sent = 0
                try:
                    while sent < ENDLESS_CEILING:
                        self.wfile.write(framed)
                        sent += len(chunk)
                        store._sent(len(chunk))
                except OSError:
                    return  # the reader hung up: what a capped reader does

            def _write(self, data: bytes) -> None:
                try:
                    for i in range(0, len(data), CHUNK):
                        self.wfile.write(data[i:i + CHUNK])
                        store._sent(len(data[i:i + CHUNK]))
                except OSError:
                    return

        return Handler
