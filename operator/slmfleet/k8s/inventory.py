"""Read the Nodes and Pods the sizing inventory is built from, as plain API dicts (camelCase keys)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from slmfleet.k8s.client import ApiError, ConfigError, KubeClient

PAGE_SIZE = 500
REQUEST_TIMEOUT_SECONDS = 30
# Finished pods hold no devices; leaving them out keeps the list short on busy clusters.
UNFINISHED_PODS = "status.phase!=Succeeded,status.phase!=Failed"


class ClusterReadError(RuntimeError):
    """The cluster could not be reached or read; the message says which step failed."""


def list_nodes_and_pods(kubeconfig: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All Nodes and all unfinished Pods of the kubeconfig's current context.

    `kubeconfig` None (or "") means the default one ($KUBECONFIG, ~/.kube/config), falling back to
    the in-cluster service account when running in a pod.
    """
    try:
        client = KubeClient(kubeconfig or None, request_timeout=(REQUEST_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS))
    except (ConfigError, OSError, ValueError) as exc:
        raise ClusterReadError(f"cannot load kubeconfig {kubeconfig or '(default)'}: {exc}") from exc
    return asyncio.run(_read(client))


async def _read(client: KubeClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    try:
        nodes = await _list_all(client, "nodes")
        pods = await _list_all(client, "pods", field_selector=UNFINISHED_PODS)
    finally:
        await client.close()
    return nodes, pods


async def _list_all(client: KubeClient, what: str, field_selector: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    try:
        async for page in client.list_pages("v1", what, field_selector=field_selector, page_size=PAGE_SIZE):
            items.extend(page)
    except ApiError as exc:
        raise ClusterReadError(f"listing {what} failed: HTTP {exc.status} {exc.reason}") from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise ClusterReadError(f"listing {what} failed: {exc}") from exc
    return items
