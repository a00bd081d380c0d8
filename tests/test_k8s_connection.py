"""The API connection without the kubernetes package: kubeconfigs as kubectl reads them, the
service account in a pod, credentials read afresh, and the API server's errors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from slmfleet.k8s import connection
from slmfleet.k8s.client import ApiError, KubeClient
from slmfleet.k8s.connection import ConfigError

CA = b"-----BEGIN CERTIFICATE-----\nnot-a-real-one\n-----END CERTIFICATE-----\n"


def write_kubeconfig(path: Path, user: dict, cluster: dict | None = None, namespace: str | None = None) -> Path:
    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "other", "cluster": {"server": "https://127.0.0.9:1"}},
                     {"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443/"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": context}],
    }))
    return path


def test_a_kubeconfig_with_inline_data_and_the_current_context(tmp_path):
    path = write_kubeconfig(tmp_path / "config", {
        "client-certificate-data": base64.b64encode(b"CERT").decode(),
        "client-key-data": base64.b64encode(b"KEY").decode(),
    }, {"server": "https://127.0.0.1:6443/", "certificate-authority-data": base64.b64encode(CA).decode(),
        "proxy-url": "http://127.0.0.1:3128"}, "team-a")
    conn = connection.load(str(path))
    assert conn.server == "https://127.0.0.1:6443" and conn.ca_pem == CA and not conn.insecure
    assert conn.proxy == "http://127.0.0.1:3128"
    assert (conn.cert_pem, conn.key_pem, conn.token, conn.namespace) == (b"CERT", b"KEY", None, "team-a")


def test_file_references_are_relative_to_the_kubeconfig(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(CA)
    (tmp_path / "token").write_text("first\n")
    path = write_kubeconfig(tmp_path / "config", {"tokenFile": "token"},
                            {"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"})
    conn = connection.load(str(path))
    assert conn.ca_pem == CA
    assert conn.credentials().token == "first"
    (tmp_path / "token").write_text("rotated\n")
    assert conn.credentials().token == "first"  # read again after a minute, or when asked
    assert conn.credentials(fresh=True).token == "rotated"


def test_kubeconfig_env_and_the_default_path_are_used_in_kubectls_order(tmp_path, monkeypatch):
    first = write_kubeconfig(tmp_path / "a", {"token": "from-env"})
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), str(first)]))
    assert connection.load(None).token == "from-env"
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()
    write_kubeconfig(tmp_path / ".kube" / "config", {"token": "from-home"})
    assert connection.load(None).token == "from-home"


@pytest.mark.parametrize("user, cluster, error", [
    ({"auth-provider": {"name": "oidc"}}, None, "auth-provider is not supported"),
    ({"token": "t"}, {"insecure-skip-tls-verify": True}, "names no cluster with a server"),
    ({"exec": {"args": ["x"]}}, None, "needs a command"),
])
def test_unusable_kubeconfigs_are_refused_with_the_reason(tmp_path, user, cluster, error):
    path = write_kubeconfig(tmp_path / "config", user, cluster)
    with pytest.raises(ConfigError, match=error):
        connection.load(str(path))


def test_a_missing_kubeconfig_named_explicitly_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        connection.load(str(tmp_path / "nope"))


def test_the_pods_service_account(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(CA)
    (tmp_path / "namespace").write_text("slmfleet-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    conn = connection.in_cluster(tmp_path)
    assert conn.server == "https://[fd00::1]:443" and conn.ca_pem == CA and conn.namespace == "slmfleet-system"
    assert conn.credentials().token == "sa-token"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ConfigError, match="service account"):
        connection.in_cluster(tmp_path)


def exec_plugin(tmp_path: Path, status: dict, exit_code: int = 0) -> Path:
    """A credential plugin that records its KUBERNETES_EXEC_INFO and prints an ExecCredential."""
    script = tmp_path / "bin" / "get-token"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\nimport json, os, pathlib, sys\n"
        f"pathlib.Path({str(tmp_path / 'info.json')!r}).write_text(os.environ['KUBERNETES_EXEC_INFO'])\n"
        f"print(json.dumps({{'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential', "
        f"'status': {status!r}}}))\nsys.exit({exit_code})\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_an_exec_plugin_gives_the_token_until_it_expires(tmp_path):
    exec_plugin(tmp_path, {"token": "from-plugin", "expirationTimestamp": "2999-01-01T00:00:00Z"})
    path = write_kubeconfig(tmp_path / "config", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "./bin/get-token",
        "env": [{"name": "TEAM", "value": "a"}]}})
    conn = connection.load(str(path))
    creds = conn.credentials()
    assert creds.token == "from-plugin" and creds.expires is not None and creds.expires.year == 2999
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["kind"] == "ExecCredential" and info["spec"]["cluster"]["server"] == "https://127.0.0.1:6443"
    (tmp_path / "info.json").unlink()
    assert conn.credentials().token == "from-plugin"
    assert not (tmp_path / "info.json").exists()  # cached: not run again before it expires


def test_an_exec_plugin_that_fails_says_so_without_its_output(tmp_path):
    exec_plugin(tmp_path, {"token": "secret-value"}, exit_code=3)
    path = write_kubeconfig(tmp_path / "config", {"exec": {"command": "./bin/get-token"}})
    with pytest.raises(ConfigError, match="exited 3") as caught:
        connection.load(str(path)).credentials()
    assert "secret-value" not in str(caught.value)


# --- the client against a small API server ----------------------------------------------------------


class FakeApi(BaseHTTPRequestHandler):
    accepted_token = "new"
    seen: list[tuple[str, str, str]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        FakeApi.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") != f"Bearer {FakeApi.accepted_token}":
            self._send(401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"})
        elif self.path.startswith("/api/v1/namespaces/ns/services/taken"):
            self._send(409, {"kind": "Status", "reason": "Conflict", "message": "services \"taken\" already exists"})
        else:
            self._send(200, {"kind": "Service", "echo": json.loads(body) if body else None,
                             "contentType": self.headers.get("Content-Type")})

    def _send(self, code: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[int]:
    FakeApi.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_401_reads_a_rotated_token_and_tries_once_more(tmp_path, fake_api):
    (tmp_path / "token").write_text("old")
    path = write_kubeconfig(tmp_path / "config", {"tokenFile": "token"}, {"server": f"http://127.0.0.1:{fake_api}"})
    client = KubeClient(str(path))

    async def run() -> dict:
        client.connection.credentials()  # "old" cached
        (tmp_path / "token").write_text("new")
        try:
            return await client.apply({"apiVersion": "v1", "kind": "Service",
                                       "metadata": {"name": "svc", "namespace": "ns"}})
        finally:
            await client.close()

    answer = asyncio.run(run())
    assert answer["contentType"] == "application/apply-patch+yaml" and answer["echo"]["metadata"]["name"] == "svc"
    assert [a for _, _, a in FakeApi.seen] == ["Bearer old", "Bearer new"]
    method, target, _ = FakeApi.seen[-1]
    assert method == "PATCH" and target == "/api/v1/namespaces/ns/services/svc?fieldManager=slmfleet&force=true"


def test_errors_carry_the_api_servers_status_and_a_fixed_token_is_not_retried(tmp_path, fake_api):
    path = write_kubeconfig(tmp_path / "config", {"token": "new"}, {"server": f"http://127.0.0.1:{fake_api}"})
    client = KubeClient(str(path))

    async def run() -> None:
        try:
            await client.get("v1", "Service", "ns", "taken")
        finally:
            await client.close()

    with pytest.raises(ApiError) as caught:
        asyncio.run(run())
    assert (caught.value.status, caught.value.reason) == (409, "Conflict") and "already exists" in str(caught.value)
    FakeApi.accepted_token = "other"
    try:
        with pytest.raises(ApiError, match="Unauthorized"):
            asyncio.run(run())
    finally:
        FakeApi.accepted_token = "new"
    assert len(FakeApi.seen) == 2  # a token written in the kubeconfig cannot have rotated: no second try


def test_the_operator_process_does_not_load_the_kubernetes_package():
    code = ("import sys; from slmfleet.cli.operator import keep_kubernetes_package_out; "
            "keep_kubernetes_package_out(); import slmfleet.controller.main, kopf; "
            "print(sorted(m for m in sys.modules if m and m.split('.')[0] == 'kubernetes' and sys.modules[m]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_kubeconfigs_proxy_url_carries_the_requests(tmp_path, fake_api):
    # Nothing listens on the server's port: only through the proxy does the call get an answer.
    path = write_kubeconfig(tmp_path / "config", {"token": "new"},
                            {"server": "http://127.0.0.2:9", "proxy-url": f"http://127.0.0.1:{fake_api}"})
    client = KubeClient(str(path))

    async def run() -> dict | None:
        try:
            return await client.get("v1", "Service", "ns", "svc")
        finally:
            await client.close()

    assert asyncio.run(run())["kind"] == "Service"
    assert [target for _, target, _ in FakeApi.seen] == ["http://127.0.0.2:9/api/v1/namespaces/ns/services/svc"]
