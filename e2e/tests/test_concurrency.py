"""One tenant's slow storage does not hold up another tenant's model: the operator reconciles
models on several workers, one model at a time each."""

from __future__ import annotations

import socket
import threading
import uuid

from kubernetes import client

from e2e.tests.conftest import S3_CREDENTIALS_META, delete_models
from e2e.tests.test_smallmodel import QWEN_05B, create, get, model_body
from e2e.wait import wait_for


class Tarpit:
    """A TCP server on loopback that accepts connections and never answers: an S3 endpoint that
    has gone quiet. `held` are the connections it accepted, `open` counts those still open."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    @staticmethod
    def still_open(conn: socket.socket) -> bool:
        """The client has not closed it (a closed connection reads EOF)."""
        conn.setblocking(False)
        try:
            return conn.recv(1 << 16, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # open, nothing to read
        except OSError:
            return False

    @property
    def open(self) -> int:
        return sum(self.still_open(conn) for conn in self.held)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_model_whose_storage_never_answers_does_not_delay_another_tenants_model(operator, crs, core, apps,
                                                                                     namespace):
    other = f"t-other-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    tarpit = Tarpit()
    try:
        core.create_namespaced_secret(namespace, {"metadata": S3_CREDENTIALS_META, "stringData": {
            "AWS_ACCESS_KEY_ID": "tenant-a", "AWS_SECRET_ACCESS_KEY": "tenant-a-secret"}})
        stuck = model_body("stuck")
        stuck["spec"]["source"] = {"uri": "s3://models/stuck/", "digest": "sha256:" + "1" * 64,
                                   "s3": {"endpoint": f"http://127.0.0.1:{tarpit.port}",
                                          "credentialsSecret": {"name": "s3-creds"}}}
        create(crs, namespace, stuck)
        wait_for(lambda: tarpit.open > 0, 30, 0.1, "the operator to connect to the silent endpoint")

        # Another tenant's model, while a worker waits on that connection: it is reconciled (sized,
        # placed, its Deployment applied) at once, not after the first model's read gives up.
        create(crs, other, model_body("quick", QWEN_05B, serving={"maxModelLen": 4096}))
        placed = wait_for(lambda: (s := get(crs, other, "quick").get("status") or {}).get("placement") and s,
                          30, 0.2, "the other tenant's model to be placed")
        assert placed["observedGeneration"] == 1
        assert apps.read_namespaced_deployment(f"quick-{placed['revision']}", other)
        # The first model's first read was still waiting then (not a retry's new connection): the
        # second model did not wait for it.
        assert Tarpit.still_open(tarpit.held[0])
        assert not (get(crs, namespace, "stuck").get("status") or {}).get("placement")
        # Nor did the first model's own reconcile wait: the read runs in the background, and its
        # status says so while the connection hangs.
        reading = [c for c in (get(crs, namespace, "stuck").get("status") or {}).get("conditions") or []
                   if c["type"] == "WeightsVerified"]
        assert [(c["status"], c["reason"]) for c in reading] == [("Unknown", "Reading")]
        assert Tarpit.still_open(tarpit.held[0])
    finally:
        delete_models(crs.api_client, other)
        core.delete_namespace(other, grace_period_seconds=0)
        tarpit.close()
