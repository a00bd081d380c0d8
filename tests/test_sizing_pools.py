import pytest
import yaml

from e2e import pools as e2e_pools
from slmfleet.sizing import pools
from tests.sizing_nodes import DEFAULT_POOLS


def test_e2e_pools_reexports_the_one_implementation():
    assert e2e_pools.expand is pools.expand and e2e_pools.node_manifest is pools.node_manifest
    assert e2e_pools.PoolsError is pools.PoolsError and e2e_pools.NodeSpec is pools.NodeSpec
    assert e2e_pools.AGENT_LABEL == pools.AGENT_LABEL and e2e_pools.POD_CIDR_FIRST_OCTET == 64
    from_file = e2e_pools.expand(*e2e_pools.load_pools_doc(DEFAULT_POOLS))
    assert from_file == pools.expand(*pools.parse_pools_doc(yaml.safe_load(DEFAULT_POOLS.read_text())))


def test_pools_parse_from_a_mapping():
    parsed, network = pools.parse_pools_doc({"podCIDRFirstOctet": 100, "pools": [
        {"name": "l4", "nodes": 2, "gpu": {"product": "NVIDIA-L4", "memoryMiB": 23034, "count": 1}}]})
    assert network.first_octet == 100 and parsed[0].gpu.product == "NVIDIA-L4" and parsed[0].nodes == 2


def test_ready_nodes_look_like_what_a_running_cluster_returns():
    nodes = pools.ready_nodes_from_pools_doc({"pools": [
        {"name": "l4", "gpu": {"product": "NVIDIA-L4", "memoryMiB": 23034, "count": 1}}, {"name": "cpu"}]})
    assert [n["metadata"]["name"] for n in nodes] == ["l4-0", "cpu-0"]
    assert nodes[0]["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert nodes[0]["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert nodes[0]["metadata"]["labels"]["nvidia.com/gpu.memory"] == "23034"


@pytest.mark.parametrize("doc, error", [
    (None, "no pools"),
    ([1, 2], "must be a mapping"),
    ({"pools": ["l4"]}, "every pool must be a mapping"),
    ({"pools": [{"name": "a", "gpu": "L4"}]}, "bad gpu entry"),
])
def test_malformed_documents_raise_pools_errors(doc, error):
    with pytest.raises(pools.PoolsError, match=error):
        pools.parse_pools_doc(doc)


def test_unreadable_yaml_is_a_pools_error(tmp_path):
    f = tmp_path / "pools.yaml"
    f.write_text("pools: [\n")
    with pytest.raises(e2e_pools.PoolsError, match="not YAML"):
        e2e_pools.load_pools_doc(f)
