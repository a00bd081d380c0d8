"""The Gateway API CRDs are installed from the module's own manifests, and the API server accepts
the HTTPRoute the operator's builder makes (no gateway implementation is needed to check weights)."""

import json

from slmfleet.api.config import OperatorConfig
from slmfleet.api.modelrollout import HttpRouteTraffic
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.traffic import build_http_route

CONFIG = OperatorConfig.model_validate({
    "vllmImage": "vllm/vllm-openai@sha256:" + "a" * 64, "loaderImage": "slmfleet/slmfleet@sha256:" + "b" * 64})


def test_built_http_route_is_accepted_with_its_weights(cluster, namespace):
    route = build_http_route(ModelOwner("qwen", namespace, ""), HttpRouteTraffic.model_validate(
        {"parentRefs": [{"name": "inference"}]}), "r1", "r2", 25, CONFIG)
    route["metadata"].pop("ownerReferences")  # no owner object in this test
    cluster._kubectl("apply", "-f", "-", input=json.dumps(route))
    live = json.loads(cluster._kubectl("get", "httproute", "qwen", "-n", namespace, "-o", "json").stdout)
    assert [(b["name"], b["weight"]) for b in live["spec"]["rules"][0]["backendRefs"]] == [("qwen-r1", 75), ("qwen-r2", 25)]
