"""Read the Nodes and Pods the sizing inventory is built from, as plain API dicts (camelCase keys)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

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
    api = _api_client(kubeconfig or None)
    with api:
        core = client.CoreV1Api(api)
        nodes = _list_all(core.list_node, "nodes")
        pods = _list_all(core.list_pod_for_all_namespaces, "pods", field_selector=UNFINISHED_PODS)
    return nodes, pods


def _api_client(kubeconfig: str | None) -> client.ApiClient:
    try:
        return config.new_client_from_config(config_file=kubeconfig)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            except ConfigException as in_cluster:
                raise ClusterReadError(f"no usable kubeconfig ({exc}) or in-cluster config ({in_cluster})") from exc
        raise ClusterReadError(f"cannot load kubeconfig {kubeconfig or '(default)'}: {exc}") from exc


def _list_all(list_call: Callable[..., Any], what: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token = None
    while True:
        try:
            response = list_call(
                limit=PAGE_SIZE,
                _continue=token,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
                **params,
            )
            page = json.loads(response.data)
        except ApiException as exc:
            raise ClusterReadError(f"listing {what} failed: HTTP {exc.status} {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ClusterReadError(f"listing {what} failed: {exc}") from exc
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items
