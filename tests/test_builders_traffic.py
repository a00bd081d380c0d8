import pytest

from slmfleet.api.config import OperatorConfig
from slmfleet.api.modelrollout import HttpRouteTraffic
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.traffic import build_http_route

CONFIG = OperatorConfig.model_validate({
    "vllmImage": "vllm/vllm-openai@sha256:" + "a" * 64, "loaderImage": "slmfleet/slmfleet@sha256:" + "b" * 64})
OWNER = ModelOwner(name="qwen", namespace="team-a", uid="u-1")
TRAFFIC = HttpRouteTraffic.model_validate({"parentRefs": [{"name": "inference", "namespace": "gateways"}],
                                           "hostnames": ["qwen.internal"]})


def weights(route: dict) -> dict[str, int]:
    return {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}


def test_weights_split_between_stable_and_candidate_services():
    route = build_http_route(OWNER, TRAFFIC, "r-stable", "r-canary", 10, CONFIG)
    assert weights(route) == {"qwen-r-stable": 90, "qwen-r-canary": 10}
    assert route["metadata"]["name"] == "qwen" and route["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert route["spec"]["parentRefs"] == [{"name": "inference", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["qwen.internal"]
    assert all(b["port"] == 8000 and b["kind"] == "Service" for b in route["spec"]["rules"][0]["backendRefs"])


def test_without_a_candidate_everything_goes_to_the_stable():
    assert weights(build_http_route(OWNER, TRAFFIC, "r-stable", None, 50, CONFIG)) == {"qwen-r-stable": 100}


@pytest.mark.parametrize("weight", [-1, 101])
def test_weight_is_a_percentage(weight):
    with pytest.raises(ValueError):
        build_http_route(OWNER, TRAFFIC, "a", "b", weight, CONFIG)
