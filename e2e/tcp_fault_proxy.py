"""A fault-injecting TCP proxy on loopback, for what speaks TLS end to end (the API server).

e2e/fault_proxy.py parses HTTP to fault single requests, which needs the plain bytes; a client of
the API server speaks TLS with a client certificate to it, so in front of the API server only the
connection can be faulted, not a request. This proxy forwards the bytes of each connection
unchanged (the certificate names 127.0.0.1, so a kubeconfig may point at the proxy's port) and:

- `latency`: waits that many seconds before it forwards each chunk it read, in both directions
  (a slow network or a slow API server: every request and every watch event comes late);
- `drop_all()`: cuts every open connection at once (a TCP RST), as a restarting load balancer
  or a flaky network would; watches break mid-stream and requests in flight fail;
- `refuse`: new connections are accepted and cut at once (the API server unreachable).

It runs its own asyncio event loop in a background thread:

    proxy = TcpFaultProxy(cluster.ports.apiserver)
    port = proxy.start()
    proxy.latency = 0.5
    proxy.drop_all()
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import threading

_READ_SIZE = 64 * 1024


class TcpFaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port  # 0: an ephemeral port, known after start()
        self.latency = 0.0
        self.refuse = False
        self.stats = {"connections": 0, "dropped": 0, "refused": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._open: set[asyncio.Transport] = set()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> int:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tcp-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the TCP fault proxy did not start")
        if failed:
            raise failed[0]
        return self.port

    def stop(self, timeout: float = 10) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for transport in list(self._open):
                transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = None

    def drop_all(self) -> int:
        """Cuts every open connection (both sides, with a RST); how many client connections it cut."""
        assert self._loop is not None

        async def cut() -> int:
            transports = list(self._open)
            for transport in transports:
                transport.abort()
            return len(transports) // 2

        dropped = asyncio.run_coroutine_threadsafe(cut(), self._loop).result(10)
        self.stats["dropped"] += dropped
        return dropped

    def __enter__(self) -> TcpFaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        client = cwriter.transport
        if self.refuse:
            self.stats["refused"] += 1
            client.abort()
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.target)
        except OSError:
            client.abort()
            return
        upstream = uwriter.transport
        self._open |= {client, upstream}
        try:
            await asyncio.gather(self._pipe(creader, uwriter), self._pipe(ureader, cwriter))
        finally:
            self._open -= {client, upstream}
            client.abort()
            upstream.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_READ_SIZE):
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # a half-close goes on to the other side
        except (ConnectionError, OSError, RuntimeError):
            writer.transport.abort()
