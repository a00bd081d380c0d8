"""The API client gives up on an API server that stops answering, instead of hanging a worker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
import yaml

from slmfleet.k8s.client import KubeClient


@contextlib.contextmanager
def silent_listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """Accepts TCP connections on loopback and never answers (a stopped API server): its port,
    and the connections it holds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield sock.getsockname()[1], held
    finally:
        sock.close()
        for conn in held:
            conn.close()


@pytest.fixture
def silent_server():
    with silent_listener() as (port, _):
        yield port


def kubeconfig(tmp_path, port: int) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return str(path)


def test_connections_have_tcp_keepalive(tmp_path):
    """Every connection the client opens has keepalive probes, so a half-open one is given up."""
    accepted: list[socket.socket] = []
    with silent_listener() as (port, held):
        client = KubeClient(kubeconfig(tmp_path, port), request_timeout=(1.0, 0.3))

        async def call() -> None:
            with contextlib.suppress(TimeoutError):
                await client.get("v1", "Service", "ns", "svc")
            connector = client._session.connector
            accepted.extend(connector._socket_factory(info) for info in socket.getaddrinfo(
                "127.0.0.1", port, type=socket.SOCK_STREAM)[:1])
            await client.close()

        asyncio.run(call())
        assert len(held) == 1
    sock = accepted[0]
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    finally:
        sock.close()


def test_a_call_to_a_server_that_never_answers_fails_at_its_deadline(tmp_path, silent_server):
    client = KubeClient(kubeconfig(tmp_path, silent_server), request_timeout=(1.0, 1.0))
    # The client's own read timeout must end the call; a hang ends in wait_for's TimeoutError,
    # whose empty message does not match.
    with pytest.raises(Exception, match="(?i)read timed out"):
        asyncio.run(asyncio.wait_for(client.get("v1", "Service", "ns", "svc"), 60))


def test_a_timed_out_get_is_not_retried_inside_the_call(tmp_path):
    """A read timeout is not retried inside the call (HTTP clients often retry a GET a few times:
    several deadlines in one call). The work queue retries reconciles itself: one request."""
    with silent_listener() as (port, held):
        client = KubeClient(kubeconfig(tmp_path, port), request_timeout=(1.0, 0.3))
        with pytest.raises(Exception, match="(?i)read timed out"):
            asyncio.run(asyncio.wait_for(client.get("v1", "Service", "ns", "svc"), 60))
        assert len(held) == 1
