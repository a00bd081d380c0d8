"""A fault-injecting HTTP/1.1 proxy on loopback, in front of the e2e S3 server.

It forwards every byte unchanged (request line, headers including Host, bodies), so S3 SigV4
signatures made for the proxy's address still validate at the server behind it; it only parses
enough HTTP to know where each request and response ends (Content-Length, chunked, 1xx interim
responses such as `100 Continue`, HEAD/204/304, read-until-close) and applies rules:

- `slowdown` / `internal_error` / `error`: answer 503 SlowDown / 500 InternalError / any status
  with an S3 XML error body, without contacting the server, then close the connection;
- `reset`: forward a successful response's head and `after_bytes` bytes of its body, then cut
  the connection (FIN; `hard=True` sends a TCP RST instead, which may drop bytes still in flight);
- `slow`: forward a successful response's body in `chunk_size` pieces with `delay` seconds between
  them (and `head_delay` before the head).

A rule matches a request by method (None: any) and a substring of its percent-decoded path
(`/bucket/key` with path-style addressing) and, optionally, of its query string; it fires for the
first `times` matching requests (None: every one). Rules are tried in the order they were added.

The proxy runs its own asyncio event loop in a background thread, so synchronous tests use it:

    proxy = FaultProxy(s3.port).start()          # -> the proxy's port (ephemeral unless port=...)
    rule = proxy.add_rule("slowdown", method="GET", key="model.safetensors", times=2)
    ...
    assert rule.injected == 2 and proxy.stats["injected"] == 2
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

ACTIONS = ("slowdown", "internal_error", "error", "reset", "slow")
ERROR_ACTIONS = ("slowdown", "internal_error", "error")
_DEFAULT_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "error": (503, "ServiceUnavailable", "Please reduce your request rate."),
}
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}
_HEAD_LIMIT = 1 << 20
_READ_SIZE = 64 * 1024


@dataclass
class Rule:
    """One fault. Counters are updated by the proxy thread; read them from tests."""

    action: str
    method: str | None = None
    key: str = ""
    query: str = ""
    times: int | None = 1
    status: int = 0
    code: str = ""
    message: str = ""
    after_bytes: int = 0
    hard: bool = False
    delay: float = 0.0
    chunk_size: int = 16 * 1024
    head_delay: float = 0.0
    name: str = ""
    matched: int = 0     # requests that matched (for reset/slow: also ones whose response did not qualify)
    injected: int = 0    # faults actually injected
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def matches(self, method: str, path: str, query: str) -> bool:
        return ((self.method is None or self.method.upper() == method)
                and self.key in path and self.query in query)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.injected >= self.times

    def _try_consume(self) -> bool:
        with self._lock:
            if self.exhausted:
                return False
            self.injected += 1
            return True


@dataclass
class RequestRecord:
    """One request the proxy saw, logged before the client can see its response's end (so a test
    that just got its answer finds it). outcome: "forwarded", or the action of the rule that fired."""

    method: str
    path: str
    query: str
    range: str | None
    outcome: str
    status: int | None
    rule: str | None
    at: float                # time.time() when the response (or fault) began
    bytes_sent: int = 0      # response body bytes sent to the client (final once the response ended)


@dataclass
class _Request:
    head: bytes
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]

    @property
    def expect_continue(self) -> bool:
        return self.headers.get("expect", "").lower() == "100-continue"

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        return "close" not in conn if self.version == "HTTP/1.1" else "keep-alive" in conn


class _Cut(Exception):
    """The connection was cut on purpose."""


class FaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0,
                 host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._rules: list[Rule] = []
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10) -> int:
        """Starts listening (in a background thread); returns the port."""
        if self._thread is not None:
            return self.port
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._handle, self.host, self.port, limit=_HEAD_LIMIT, reuse_address=True))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.target[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("fault proxy did not start")
        if errors:
            self._thread = None
            raise RuntimeError(f"fault proxy cannot listen on {self.host}:{self.port}: {errors[0]}") from errors[0]
        return self.port

    def stop(self, timeout: float = 10) -> None:
        """Closes the listener and every open connection; joins the thread."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None

    def add_rule(self, action: str, *, method: str | None = None, key: str = "", query: str = "",
                 times: int | None = 1, status: int | None = None, code: str | None = None,
                 message: str | None = None, after_bytes: int = 0, hard: bool = False, delay: float = 0.0,
                 chunk_size: int = 16 * 1024, head_delay: float = 0.0, name: str | None = None) -> Rule:
        """Adds a rule (see the module docstring) and returns it; its `injected` counts the faults."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {ACTIONS}")
        if chunk_size <= 0 or after_bytes < 0 or (times is not None and times < 0):
            raise ValueError("chunk_size must be > 0, after_bytes and times >= 0")
        d_status, d_code, d_message = _DEFAULT_ERRORS.get(action, (0, "", ""))
        rule = Rule(action=action, method=method.upper() if method else None, key=key, query=query, times=times,
                    status=status or d_status, code=code or d_code, message=message or d_message,
                    after_bytes=after_bytes, hard=hard, delay=delay, chunk_size=chunk_size, head_delay=head_delay,
                    name=name or f"{action}-{next(self._names)}")
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Removes every rule and resets the statistics and the request log."""
        with self._lock:
            self._rules = []
            self._records = []
            self._connections = 0

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request seen since start (or clear()), oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def stats(self) -> dict:
        """{"connections", "requests", "forwarded", "injected", "by_action": {...}, "by_rule": {...}}"""
        with self._lock:
            records, rules, connections = list(self._records), list(self._rules), self._connections
        by_action: dict[str, int] = {}
        for r in records:
            if r.rule is not None:
                by_action[r.outcome] = by_action.get(r.outcome, 0) + 1
        injected = sum(by_action.values())
        return {
            "connections": connections,
            "requests": len(records),
            "forwarded": len(records) - injected,
            "injected": injected,
            "by_action": by_action,
            "by_rule": {rule.name: rule.injected for rule in rules},
        }

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- rules

    def _candidate(self, req: _Request) -> Rule | None:
        with self._lock:
            rules = list(self._rules)
        for rule in rules:
            if not rule.exhausted and rule.matches(req.method, req.path, req.query):
                with rule._lock:
                    rule.matched += 1
                return rule
        return None

    def _record(self, req: _Request, outcome: str, status: int | None, rule: Rule | None,
                sent: int = 0) -> RequestRecord:
        record = RequestRecord(method=req.method, path=req.path, query=req.query, range=req.headers.get("range"),
                               outcome=outcome, status=status, rule=rule.name if rule else None, bytes_sent=sent,
                               at=time.time())
        with self._lock:
            self._records.append(record)
        return record

    # ---------------------------------------------------------------- connections

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                req = await _read_request(creader)
                if req is None:
                    return
                rule = self._candidate(req)
                if rule is not None and rule.action in ERROR_ACTIONS and rule._try_consume():
                    if not req.expect_continue:
                        await _pipe_body(creader, None, req.headers, request=True)
                    await self._send_error(cwriter, req, rule)
                    await _graceful_close(cwriter, creader)
                    return
                if upstream is not None and upstream[0].at_eof():  # the server closed it while idle
                    upstream[1].close()
                    upstream = None
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.target, limit=_HEAD_LIMIT)
                ureader, uwriter = upstream
                uwriter.write(req.head)
                # The body goes up while the response comes down (`Expect: 100-continue`).
                body = asyncio.ensure_future(_pipe_body(creader, uwriter, req.headers, request=True))
                try:
                    keep = await self._forward_response(req, ureader, cwriter, rule)
                    if body.done():
                        body.result()
                    else:  # the server answered without reading the whole body (e.g. refused 100-continue)
                        keep = False
                finally:
                    if not body.done():
                        body.cancel()
                    elif not body.cancelled():
                        body.exception()  # retrieved: no "exception was never retrieved" noise
                if not keep or not req.keep_alive:
                    return
        except (_Cut, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            return
        except asyncio.CancelledError:  # stop(); returning keeps 3.11's stream callback from logging it
            return
        finally:
            self._tasks.discard(task)
            for writer in (cwriter, upstream[1] if upstream else None):
                if writer is not None and not writer.is_closing():
                    writer.close()

    async def _send_error(self, cwriter: asyncio.StreamWriter, req: _Request, rule: Rule) -> None:
        bucket, _, key = req.path.lstrip("/").partition("/")
        request_id = f"FAULTPROXY{rule.injected:08d}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{_xml(rule.code)}</Code><Message>{_xml(rule.message)}</Message>"
            + (f"<BucketName>{_xml(bucket)}</BucketName>" if bucket else "")
            + (f"<Key>{_xml(key)}</Key>" if key else "")
            + f"<Resource>{_xml(req.path)}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>fault-proxy</HostId></Error>"
        ).encode()
        reason = _REASONS.get(rule.status, "Error")
        head = (f"HTTP/1.1 {rule.status} {reason}\r\n"
                "Content-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"x-amz-request-id: {request_id}\r\n"
                "Server: slmfleet-fault-proxy\r\n"
                "Connection: close\r\n\r\n").encode()
        self._record(req, rule.action, rule.status, rule, 0 if req.method == "HEAD" else len(body))
        cwriter.write(head if req.method == "HEAD" else head + body)
        await cwriter.drain()

    async def _forward_response(self, req: _Request, ureader: asyncio.StreamReader,
                                cwriter: asyncio.StreamWriter, candidate: Rule | None) -> bool:
        """Forwards one response (after any 1xx interim ones); returns whether the upstream
        connection may be reused. Raises _Cut after a `reset`."""
        while True:
            head = await ureader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(head)
            parts = status_line.split(" ", 2)
            version, status = parts[0], int(parts[1])
            if 100 <= status < 200 and status != 101:
                cwriter.write(head)
                await cwriter.drain()
                continue
            break
        rule = None
        if (candidate is not None and candidate.action in ("reset", "slow") and 200 <= status < 300
                and _has_body(req.method, status)):
            length = headers.get("content-length")
            # A reset only counts if it really cuts the body short.
            qualifies = candidate.action == "slow" or length is None or int(length) > candidate.after_bytes
            if qualifies and candidate._try_consume():
                rule = candidate
        if rule is not None and rule.head_delay:
            await asyncio.sleep(rule.head_delay)
        record = self._record(req, rule.action if rule else "forwarded", status, rule)
        cwriter.write(head)
        if rule is not None and rule.action == "reset":
            record.bytes_sent = await _pipe_body(ureader, cwriter, headers, request=False, method=req.method,
                                                 status=status, limit=rule.after_bytes)
            await _flush(cwriter)
            _cut(cwriter, hard=rule.hard)
            raise _Cut()
        if rule is not None:  # slow
            sent = await _pipe_body(ureader, cwriter, headers, request=False, method=req.method, status=status,
                                    chunk_size=rule.chunk_size, delay=rule.delay, progress=record)
        else:
            sent = await _pipe_body(ureader, cwriter, headers, request=False, method=req.method, status=status,
                                    progress=record)
        await cwriter.drain()
        record.bytes_sent = sent
        conn = headers.get("connection", "").lower()
        keep = ("close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn)
        framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower() \
            or not _has_body(req.method, status)
        return keep and framed


# -------------------------------------------------------------------- HTTP plumbing


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return lines[0], headers


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None  # the client closed an idle connection
    request_line, headers = _parse_head(head)
    method, target, version = request_line.split(" ", 2)
    parts = urlsplit(target)
    return _Request(head=head, method=method.upper(), target=target, path=unquote(parts.path),
                    query=parts.query, version=version.strip(), headers=headers)


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304) and not 100 <= status < 200


async def _pipe_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, headers: dict[str, str],
                     *, request: bool, method: str = "", status: int = 0, limit: int | None = None,
                     chunk_size: int = _READ_SIZE, delay: float = 0.0,
                     progress: RequestRecord | None = None) -> int:
    """Copies one message body from reader to writer (None: discard) as raw bytes, framed by
    its headers. Stops after `limit` bytes if given; sleeps `delay` between `chunk_size` pieces.
    Returns the bytes written (also kept up to date in `progress.bytes_sent`)."""
    if not request and not _has_body(method, status):
        return 0
    sent = 0

    async def emit(data: bytes) -> bool:
        nonlocal sent
        while data:
            piece = data[:chunk_size]
            if limit is not None and sent + len(piece) > limit:
                piece = piece[:limit - sent]
            if writer is not None and piece and delay and sent:
                await asyncio.sleep(delay)
            sent += len(piece)
            if progress is not None:
                progress.bytes_sent = sent
            if writer is not None and piece:
                writer.write(piece)
                await writer.drain()
            data = data[len(piece):]
            if limit is not None and sent >= limit:
                return False
        return True

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            if not await emit(size_line):
                return sent
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    line = await reader.readuntil(b"\r\n")
                    if not await emit(line) or line == b"\r\n":
                        return sent
            remaining = size + 2  # data and its CRLF
            while remaining:
                data = await reader.readexactly(min(remaining, _READ_SIZE))
                remaining -= len(data)
                if not await emit(data):
                    return sent
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, _READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            if not await emit(data):
                return sent
        return sent
    if request:
        return 0  # a request without Content-Length or chunked has no body
    while data := await reader.read(_READ_SIZE):  # response delimited by the connection's end
        if not await emit(data):
            return sent
    return sent


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Waits until everything written is in the kernel (drain() alone stops at the high-water mark)."""
    writer.transport.set_write_buffer_limits(high=0)
    await writer.drain()
    deadline = time.monotonic() + 5
    while writer.transport.get_write_buffer_size() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def _cut(writer: asyncio.StreamWriter, *, hard: bool) -> None:
    sock: socket.socket | None = writer.get_extra_info("socket")
    if hard and sock is not None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


async def _graceful_close(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, timeout: float = 2.0) -> None:
    """Half-closes, then reads what the client still sends until it closes too, so the kernel does
    not answer unread data with a RST that could destroy the response we just sent."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = await asyncio.wait_for(reader.read(_READ_SIZE), max(0.01, deadline - time.monotonic()))
            if not data:
                break
    except (TimeoutError, ConnectionError, OSError):
        pass
    writer.close()
