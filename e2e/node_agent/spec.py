"""Pure pieces of turning a pod spec into local processes: variable expansion, path mapping,
restart back-off, container status dictionaries. No I/O here, so they are unit-tested directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TMP_DIR = "/tmp"
MAX_TERMINATION_MESSAGE = 4096
# kubelet's crash-loop back-off: 10s doubling up to 5 minutes.
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: unknown references stay as written, `$$` escapes."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, value)


def field_ref(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs") or []),
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise ValueError(f"unsupported fieldRef {path!r}")


class PathMap:
    """Container paths (volume mounts, the termination-message file) mapped to host paths.

    Without a mount namespace the process sees the host file system, so every container path the
    pod spec names in a command, argument or env value is rewritten to its host location. A path
    is replaced only as a whole path component (`/models` matches `/models` and `/models/x`, never
    `/models2`), longest mount first.
    """

    def __init__(self, mounts: Mapping[str, str]):
        self.mounts = {k.rstrip("/") or "/": v for k, v in mounts.items()}
        ordered = sorted(self.mounts, key=len, reverse=True)
        if ordered:
            alternatives = "|".join(re.escape(p) for p in ordered)
            self._re = re.compile(r"(?<![\w.\-/])(" + alternatives + r")(?=/|$|[^\w.\-])")
        else:
            self._re = None

    def rewrite(self, value: str) -> str:
        if self._re is None:
            return value
        return self._re.sub(lambda m: self.mounts[m.group(1)], value)

    def host_path(self, container_path: str) -> str | None:
        rewritten = self.rewrite(container_path)
        return rewritten if rewritten != container_path else None


def container_env(env: Mapping[str, str], paths: PathMap, host_values: Mapping[str, str]) -> dict[str, str]:
    """The process's environment: container paths in values rewritten to their host locations,
    except the values the runtime itself set to host paths (`host_values`: PYTHONPATH, the pod's
    home...), which a mount such as /tmp would otherwise capture when the host path lies under it
    (a checkout in /tmp/clone)."""
    return {key: value if host_values.get(key) == value else paths.rewrite(value) for key, value in env.items()}


def backoff_seconds(restarts: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * (2 ** max(0, restarts - 1))) if restarts else 0.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """A process killed by signal N reports 128+N, as container runtimes do."""
    return 128 - returncode if returncode < 0 else returncode


def terminated_state(code: int, started: str, finished: str, message: str, container_id: str,
                     reason: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "startedAt": started,
        "finishedAt": finished,
        "containerID": container_id,
    }
    if message:
        state["message"] = message[-MAX_TERMINATION_MESSAGE:]
    return state


def pod_phase(restart_policy: str, init_failed: bool, main_states: list[dict[str, Any]]) -> str:
    """The pod phase from its containers' states (kubelet's getPhase, simplified)."""
    if init_failed:
        return "Failed"
    if not main_states:
        return "Pending"
    running = sum(1 for s in main_states if "running" in s)
    waiting = sum(1 for s in main_states if "waiting" in s)
    terminated = [s["terminated"] for s in main_states if "terminated" in s]
    if waiting and not running and not terminated:
        return "Pending"
    if running or (waiting and restart_policy != "Never"):
        return "Running"
    if len(terminated) == len(main_states):
        if restart_policy == "Always":
            return "Running"
        if all(t["exitCode"] == 0 for t in terminated):
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    return "Running"


def default_pull_policy(image: str) -> str:
    """The API server's default: Always for `:latest` or no tag (and no digest), else IfNotPresent."""
    from e2e.node_agent.registry import parse_reference

    ref = parse_reference(image)
    return "Always" if ref.digest is None and ref.tag == "latest" else "IfNotPresent"


# Client libraries read the service account token and CA from this fixed path (kubernetes'
# in-cluster config, kopf, client-go): no argument or env var names it, so rewriting paths cannot
# reach it. Mounts under it are bind-mounted there in a private mount namespace of the container.
SECRETS_DIR = "/run/secrets"
_SECRETS_PREFIXES = ("/var/run/secrets/", "/run/secrets/")
# POSIX shared memory (shm_open, Python's multiprocessing.shared_memory, semaphores) lives at this
# fixed path too. A container has its own: a tmpfs of the runtime's default size (containerd's and
# Docker's 64Mi), or the pod's volume mounted there (an emptyDir with medium Memory, the usual way to
# give vLLM more).
DEV_SHM = "/dev/shm"
DEFAULT_SHM_SIZE = "64m"


def mount_namespace_argv(mounts: Mapping[str, str], argv: list[str], read_only: set[str],
                         read_only_root: bool = False, private_shm: bool = False) -> list[str]:
    """`argv` wrapped in a mount namespace of the container's own when it needs one (`unshare
    --mount --propagation private`: what is mounted or remounted there stays there). The wrapper
    execs the program, so its pid and process group stay the container's.

    - Mounts under /var/run/secrets are bind-mounted at their paths (a tmpfs over /run/secrets
      hides the host's); read-only ones are remounted read-only.
    - `read_only_root` (the container's readOnlyRootFilesystem): the host path of every mount (its
      volumes and its termination-message file; `mounts` maps container paths to them) is
      bind-mounted onto itself, which makes it a mount of its own, then `/` is remounted read-only.
      The process writes where the pod says it may (a readOnly mount is remounted read-only too)
      and nowhere else on the root file system; for everyone else the host's root stays as it was.
      Only the root mount: on a host with other file systems (a tmpfs /tmp, say), those stay
      writable, as /dev and /proc do in a container. The process's stdout and stderr are files
      the agent opened before, so its logs are written whatever the mounts.
    - `private_shm`: /dev/shm of the container's own, the host's untouched: the volume mounted at
      /dev/shm bound there, else a fresh tmpfs of DEFAULT_SHM_SIZE. Either goes with the namespace:
      what the process leaves there (psm_*, sem.*) never reaches the host's /dev/shm.
    """
    secrets = [(path, host) for path, host in sorted(mounts.items()) if path.startswith(_SECRETS_PREFIXES)]
    shm_volume = mounts.get(DEV_SHM)
    if not secrets and not read_only_root and not private_shm:
        return argv
    script = ["set -e"]
    words: list[str] = []

    def word(value: str) -> str:
        """A positional parameter of the script holding `value` (paths are never spliced into it)."""
        words.append(value)
        return f'"${{{len(words)}}}"'

    if secrets:
        script.append(f"mount -t tmpfs -o mode=0755,size=1m slmfleet-secrets {SECRETS_DIR}")
        for path, host in secrets:
            dest, src = word("/run/" + path.split("/run/", 1)[1]), word(host)
            script.append(f"mkdir -p {dest} && mount --bind {src} {dest}")
            if path in read_only:
                script.append(f"mount -o remount,bind,ro {dest}")
    if private_shm:
        if shm_volume is not None:
            script.append(f"mount --bind {word(shm_volume)} {DEV_SHM}")
        else:
            script.append(f"mount -t tmpfs -o mode=1777,nosuid,nodev,size={DEFAULT_SHM_SIZE} shm {DEV_SHM}")
    if read_only_root:
        # A host path mounted both read-only and writable stays writable, as the writable mount is.
        writable = {host for path, host in mounts.items() if path not in read_only}
        # All bound while everything is still writable (a bind takes its source mount's flags), in
        # path order, parents first.
        binds = [(host, word(host)) for host in sorted(set(mounts.values()))]
        script += [f"mount --bind {ref} {ref}" for _, ref in binds]
        script += [f"mount -o remount,bind,ro {ref}" for host, ref in binds if host not in writable]
        script.append("mount -o remount,bind,ro /")
    script.append(f"shift {len(words)}")
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(script), "sh", *words, *argv]


def service_link_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """The Docker-links-style variables the kubelet gives a pod for each Service of its namespace
    that has a ClusterIP (enableServiceLinks): FOO_SERVICE_HOST, FOO_SERVICE_PORT[_NAME], FOO_PORT…"""
    env: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: s["metadata"]["name"]):
        sp = svc.get("spec") or {}
        ip = sp.get("clusterIP")
        ports = sp.get("ports") or []
        if not ip or ip == "None" or not ports:
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            proto = port.get("protocol", "TCP").lower()
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            prefix = f"{name}_PORT_{port['port']}_{proto.upper()}"
            env[prefix] = f"{proto}://{ip}:{port['port']}"
            env[f"{prefix}_PROTO"] = proto
            env[f"{prefix}_PORT"] = str(port["port"])
            env[f"{prefix}_ADDR"] = ip
        env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
    return env
