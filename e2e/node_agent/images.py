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
vLLM stand-in), found by the image's repository.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from e2e.node_agent.registry import PulledImage, parse_reference

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

VLLM_STANDIN = (PYTHON, "-m", "e2e.standin.vllm")


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
}

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


def from_pulled(pulled: PulledImage) -> ImageSpec:
    """What a pulled image runs: its config, with the local stand-ins for its executables."""
    repo = pulled.reference.repository
    executables = next((exe for known, exe in STANDINS.items() if repo == known or repo.endswith("/" + known)), {})
    return ImageSpec(pulled.entrypoint, pulled.cmd, executables, pulled.env, pulled.user, pulled.image_id)


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
