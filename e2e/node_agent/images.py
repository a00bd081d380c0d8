"""What each container image would run, as local commands.

The node agent has no container runtime. Instead, for every image repository it knows, this map
says what the image's ENTRYPOINT/CMD are and which local command stands in for each executable
inside the image. A pod spec is then resolved exactly as a container runtime resolves it
(`command` replaces ENTRYPOINT, `args` replaces CMD), so the pods the operator creates are exactly
those a real cluster would run; only the final executable is swapped for its local stand-in.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

VLLM_STANDIN = (PYTHON, "-m", "e2e.standin.vllm")


def _host(name: str) -> tuple[str, ...]:
    found = shutil.which(name)
    return (found,) if found else ()


@dataclass(frozen=True)
class ImageSpec:
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    executables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


_SHELL_TOOLS = ("sh", "echo", "cat", "sleep", "true", "false", "ls", "env", "test", "printf")

IMAGES: dict[str, ImageSpec] = {
    # The vLLM server image. Its ENTRYPOINT is `vllm serve`; older deployments call the API server
    # module through python3. Both reach the OpenAI-compatible stand-in (e2e/standin/vllm.py).
    "vllm/vllm-openai": ImageSpec(
        entrypoint=("vllm", "serve"),
        cmd=(),
        executables={"vllm": VLLM_STANDIN, "python3": VLLM_STANDIN, "python": VLLM_STANDIN},
    ),
    # slmfleet's own image (operator and weight loader): the `slmfleet` console script.
    "slmfleet/slmfleet": ImageSpec(
        entrypoint=("slmfleet",),
        cmd=(),
        executables={"slmfleet": (str(VENV_BIN / "slmfleet"),), "python3": (PYTHON,), "python": (PYTHON,)},
    ),
    "busybox": ImageSpec(
        entrypoint=(),
        cmd=("sh",),
        executables={tool: local for tool in _SHELL_TOOLS if (local := _host(tool))},
    ),
    "python": ImageSpec(entrypoint=(), cmd=("python3",), executables={"python3": (PYTHON,), "python": (PYTHON,)}),
}


class ImageError(Exception):
    """The image is not one this node can run (a pull error on a real node)."""


class ExecError(Exception):
    """The resolved executable does not exist in the image (a runtime start error)."""


def repository(image: str) -> str:
    """`registry.example:5000/vllm/vllm-openai:v0.11@sha256:...` -> `vllm/vllm-openai`."""
    ref = image.split("@", 1)[0]
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    last = parts[-1]
    if ":" in last:
        parts[-1] = last.split(":", 1)[0]
    path = "/".join(parts)
    return path.removeprefix("library/")


def lookup(image: str) -> ImageSpec:
    repo = repository(image)
    spec = IMAGES.get(repo)
    if spec is None:
        # Images mirrored under an organisation prefix in an air-gapped registry: match by suffix.
        for known, candidate in IMAGES.items():
            if repo.endswith("/" + known):
                return candidate
        raise ImageError(f"image repository {repo!r} ({image}) is not in the node agent's image map "
                         f"(e2e/node_agent/images.py)")
    return spec


def resolve_argv(image: str, command: list[str] | None, args: list[str] | None) -> list[str]:
    """The local argv for a container, resolved the way a container runtime does it."""
    spec = lookup(image)
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
