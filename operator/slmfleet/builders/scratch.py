"""The pod's temp directory, for containers with a read-only root file system.

Hardened pods (`hardened=True` in builders/pod.py) run the loader and vLLM with
`readOnlyRootFilesystem`; what they still write goes to volumes. Temp files go to one small
emptyDir at /tmp, shared by both containers (the loader runs to completion before vLLM starts):

- vLLM: its RPC IPC sockets (ZeroMQ `ipc://` paths under VLLM_RPC_BASE_PATH, which defaults to
  the temp dir), Triton's build of its launcher stubs (a C file compiled in a TemporaryDirectory),
  Prometheus' multiprocess files when there are several API server processes, and anything else
  that asks `tempfile`. Compile caches, which can grow to gigabytes, go to the cache volume
  instead (builders/pod.py), so an emptyDir over its limit cannot evict a serving pod.
- the loader: HOME=/tmp (where boto3 would look for ~/.aws); it writes only the weights volume and
  its termination message, which the kubelet mounts writable.
"""

from __future__ import annotations

from typing import Any

TMP_VOLUME = "tmp"
TMP_DIR = "/tmp"
# Sockets and small temp files; the compile caches are elsewhere.
TMP_SIZE_LIMIT = "1Gi"


def tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}}


def tmp_mount() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "mountPath": TMP_DIR}
