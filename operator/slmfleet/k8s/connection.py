"""Where the API server is and how to authenticate to it: a kubeconfig's current context, or the
pod's service account.

Read here rather than by the kubernetes package, whose import alone costs the operator about
50 MiB (a thousand generated model classes it never uses). What a kubeconfig may say is covered
as kubectl covers it for the operator's uses: certificate authority, client certificate and key,
bearer token, token file, and exec credential plugins (kubelogin, cloud CLIs), all inline or by
path; `insecure-skip-tls-verify`; `proxy-url`; the context's namespace. Legacy `auth-provider` entries are
refused with a message, as current kubectl does.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE_REREAD_SECONDS = 60  # kubelet rotates projected tokens well before they expire
EXEC_TIMEOUT_SECONDS = 60
EXEC_REFRESH_MARGIN = dt.timedelta(seconds=60)
MAX_EXEC_OUTPUT = 1 << 20


class ConfigError(Exception):
    """No usable kubeconfig or in-cluster service account."""


@dataclass(frozen=True)
class ExecPlugin:
    """A client-go credential plugin (users[].user.exec)."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"
    workdir: str = ""


@dataclass
class Credentials:
    """What a request is signed with at one moment: a bearer token and/or a client certificate."""

    token: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    expires: dt.datetime | None = None


@dataclass
class ApiConnection:
    server: str
    ca_pem: bytes | None = None
    insecure: bool = False
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    exec_plugin: ExecPlugin | None = None
    namespace: str | None = None
    proxy: str | None = None  # the cluster's proxy-url
    _cached: tuple[float, Credentials] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def credentials(self, *, fresh: bool = False) -> Credentials:
        """The token and client certificate to use now. A token file is read again every minute
        (and when `fresh`, after a 401); an exec plugin runs again when its credential expires."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and not fresh:
                at, cached = self._cached
                if self.exec_plugin is not None:
                    expires = cached.expires
                    if expires is None or dt.datetime.now(dt.UTC) + EXEC_REFRESH_MARGIN < expires:
                        return cached
                elif now - at < TOKEN_FILE_REREAD_SECONDS:
                    return cached
            creds = Credentials(self.token, self.cert_pem, self.key_pem)
            if self.exec_plugin is not None:
                creds = run_exec_plugin(self.exec_plugin, self.server)
                creds.cert_pem = creds.cert_pem or self.cert_pem
                creds.key_pem = creds.key_pem or self.key_pem
            elif self.token_file:
                creds.token = Path(self.token_file).read_text().strip()
            self._cached = (now, creds)
            return creds

    def ssl_context(self, creds: Credentials) -> ssl.SSLContext | None:
        """For https servers: the cluster's CA (or the system's), and the client certificate."""
        if not self.server.startswith("https:"):
            return None
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode() if self.ca_pem else None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if creds.cert_pem and creds.key_pem:
            load_cert_chain(ctx, creds.cert_pem, creds.key_pem)
        return ctx


def load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """ssl reads a certificate and key only from files: a private directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="slmfleet-tls-") as tmp:
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        for path, data in ((cert, cert_pem), (key, key_pem)):
            path.touch(mode=0o600)
            path.write_bytes(data)
        ctx.load_cert_chain(str(cert), str(key))


def load(kubeconfig: str | None = None) -> ApiConnection:
    """The connection of `kubeconfig` (None: $KUBECONFIG's first file, then ~/.kube/config), else
    of the pod's service account."""
    path = _kubeconfig_path(kubeconfig)
    if path is not None:
        return from_kubeconfig(path)
    if kubeconfig:
        raise ConfigError(f"kubeconfig {kubeconfig} does not exist")
    return in_cluster()


def _kubeconfig_path(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        return path if path.is_file() else None
    for entry in (os.environ.get("KUBECONFIG") or "").split(os.pathsep):
        if entry and Path(entry).expanduser().is_file():
            return Path(entry).expanduser()
    default = Path("~/.kube/config").expanduser()
    return default if default.is_file() else None


def in_cluster(account_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiConnection:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token = account_dir / "token"
    if not host or not port or not token.is_file():
        raise ConfigError("no kubeconfig, and not in a pod with a service account "
                          "(KUBERNETES_SERVICE_HOST/PORT and its token)")
    host = f"[{host}]" if ":" in host else host
    ca = account_dir / "ca.crt"
    namespace = account_dir / "namespace"
    return ApiConnection(server=f"https://{host}:{port}", ca_pem=ca.read_bytes() if ca.is_file() else None,
                         token_file=str(token),
                         namespace=namespace.read_text().strip() if namespace.is_file() else None)


def from_kubeconfig(path: Path) -> ApiConnection:
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path} is not a mapping")
    name = doc.get("current-context") or ""
    context = _named(doc, "contexts", "context", name)
    if context is None:
        raise ConfigError(f"kubeconfig {path} has no current context{f' {name!r}' if name else ''}")
    cluster = _named(doc, "clusters", "cluster", context.get("cluster") or "")
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"kubeconfig {path}: context {name!r} names no cluster with a server")
    user = _named(doc, "users", "user", context.get("user") or "") or {}
    if user.get("auth-provider"):
        raise ConfigError(f"kubeconfig {path}: auth-provider is not supported; use an exec credential plugin")
    base = path.parent
    return ApiConnection(
        server=str(cluster["server"]).rstrip("/"),
        ca_pem=_data(cluster, "certificate-authority", base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_pem=_data(user, "client-certificate", base),
        key_pem=_data(user, "client-key", base),
        token=user.get("token") or None,
        token_file=str(_resolve(user["tokenFile"], base)) if user.get("tokenFile") else None,
        exec_plugin=_exec(user.get("exec"), base),
        namespace=context.get("namespace") or None,
        proxy=cluster.get("proxy-url") or None,
    )


def _named(doc: dict[str, Any], section: str, key: str, name: str) -> dict[str, Any] | None:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(key), dict):
            return dict(entry[key])
    return None


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _data(section: dict[str, Any], key: str, base: Path) -> bytes | None:
    if section.get(f"{key}-data"):
        return base64.b64decode(section[f"{key}-data"])
    if section.get(key):
        return _resolve(str(section[key]), base).read_bytes()
    return None


def _exec(spec: Any, base: Path) -> ExecPlugin | None:
    if not spec:
        return None
    if not isinstance(spec, dict) or not spec.get("command"):
        raise ConfigError("kubeconfig: an exec credential plugin needs a command")
    command = str(spec["command"])
    # A command with a slash is relative to the kubeconfig's directory; a bare name is looked up on PATH.
    if "/" in command and not command.startswith("/"):
        command = str(base / command)
    env = tuple((str(e.get("name")), str(e.get("value", ""))) for e in spec.get("env") or [] if isinstance(e, dict))
    return ExecPlugin(command=command, args=tuple(str(a) for a in spec.get("args") or []), env=env,
                      api_version=str(spec.get("apiVersion") or ExecPlugin.api_version), workdir=str(base))


def run_exec_plugin(plugin: ExecPlugin, server: str) -> Credentials:
    """Runs the plugin as client-go does (KUBERNETES_EXEC_INFO in its environment, no stdin) and
    reads the ExecCredential it prints. Its stderr passes through; its output never reaches a log."""
    info = {"apiVersion": plugin.api_version, "kind": "ExecCredential",
            "spec": {"interactive": False, "cluster": {"server": server}}}
    env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
    try:
        done = subprocess.run([plugin.command, *plugin.args], env=env, cwd=plugin.workdir or None,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=EXEC_TIMEOUT_SECONDS,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"exec credential plugin {Path(plugin.command).name} did not run: {type(exc).__name__}") from exc
    if done.returncode != 0:
        raise ConfigError(f"exec credential plugin {Path(plugin.command).name} exited {done.returncode}")
    try:
        status = json.loads(done.stdout[:MAX_EXEC_OUTPUT]).get("status") or {}
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"exec credential plugin {Path(plugin.command).name} printed no ExecCredential") from exc
    expires = None
    if status.get("expirationTimestamp"):
        try:
            expires = dt.datetime.fromisoformat(str(status["expirationTimestamp"]).replace("Z", "+00:00"))
        except ValueError:
            expires = None
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if not status.get("token") and not (cert and key):
        raise ConfigError(f"exec credential plugin {Path(plugin.command).name} gave neither a token nor a certificate")
    return Credentials(token=status.get("token") or None, cert_pem=cert.encode() if cert else None,
                       key_pem=key.encode() if key else None, expires=expires)
