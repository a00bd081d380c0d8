import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from slmfleet.cli.main import main
from tests.sizing_configs import LLAMA_3_1_8B, QWEN2_5_0_5B, QWEN2_5_14B
from tests.sizing_nodes import DEFAULT_POOLS, gpu_node, gpu_pod

JSON_KEYS = {
    "weights_bytes", "kv_bytes_per_token", "total_bytes", "gpu_resource", "gpu_count", "tensor_parallel_size",
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "node_selector", "reasons", "fallbacks", "message",
}


@pytest.fixture
def config_file(tmp_path):
    def write(config, name="config.json"):
        path = tmp_path / name
        path.write_text(json.dumps(config))
        return str(path)
    return write


def size(capsys, *args):
    code = main(["size", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_placement_on_the_default_pools(capsys, config_file):
    code, out, err = size(capsys, "--config", config_file(QWEN2_5_0_5B), "--json", "--pools", str(DEFAULT_POOLS))
    assert code == 0 and err == ""
    result = json.loads(out)
    assert JSON_KEYS <= set(result)
    assert result["gpu_resource"] == "nvidia.com/mig-2g.10gb" and result["gpu_count"] == 1
    assert result["tensor_parallel_size"] == 1 and 0.9 <= result["gpu_memory_utilization"] <= 0.95
    assert (result["max_model_len"], result["max_num_seqs"]) == (32768, 8)
    assert result["node_selector"] == {"nvidia.com/mig-2g.10gb.product": "NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"}
    assert result["kv_bytes_per_token"] == 2 * 24 * 2 * 64 * 2 and result["message"] == ""
    assert [f["gpu_product"] for f in result["fallbacks"]][:2] == [
        "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "NVIDIA-L4"]


def test_text_output_names_the_placement_and_reasons(capsys, config_file):
    code, out, _ = size(capsys, "--config", config_file(LLAMA_3_1_8B), "--pools", str(DEFAULT_POOLS),
                        "--gpu-products", "NVIDIA-A100-SXM4-40GB", "--max-model-len", "32768")
    assert code == 0
    assert "Placement" in out and "2× NVIDIA-A100-SXM4-40GB" in out and "Tensor parallel  2" in out
    assert "Reasons:" in out and "GPU mem util" in out and "Node selector    nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB" in out


def test_without_an_inventory_it_prints_the_memory_figures(capsys, config_file):
    code, out, _ = size(capsys, "--config", config_file(LLAMA_3_1_8B), "--concurrency", "4", "--max-model-len", "8192")
    assert code == 0
    assert "Weights" in out and "14.96 GiB" in out and "131,072 bytes" in out
    assert "at 8192 tokens × 4 sequences" in out and "Placement" not in out
    code, out, _ = size(capsys, "--config", config_file(LLAMA_3_1_8B), "--json", "--kv-cache-dtype", "fp8")
    result = json.loads(out)
    assert code == 0 and result["gpu_resource"] is None and result["kv_bytes_per_token"] == 65536
    assert result["message"] == "" and result["profile"]["max_model_len"] == 32768


def test_nothing_fits_exits_1_with_the_message(capsys, config_file):
    code, out, _ = size(capsys, "--config", config_file(QWEN2_5_14B), "--pools", str(DEFAULT_POOLS),
                        "--gpu-products", "NVIDIA-L4", "--max-model-len", "32768", "--json")
    result = json.loads(out)
    assert code == 1 and result["gpu_resource"] is None and result["fallbacks"] == []
    assert result["message"].startswith("needs ") and "NVIDIA-L4" in result["message"]
    code, out, _ = size(capsys, "--config", config_file(QWEN2_5_14B), "--pools", str(DEFAULT_POOLS),
                        "--gpu-products", "NVIDIA-L4", "--max-model-len", "32768")
    assert code == 1 and "No placement: needs" in out


def test_a_safetensors_index_gives_exact_weights(capsys, config_file, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN2_5_0_5B))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 988_097_536}}))
    code, out, _ = size(capsys, "--config", str(model), "--json")
    assert code == 0 and json.loads(out)["weights_bytes"] == 988_097_536
    assert json.loads(out)["profile"]["weights_exact"] is True
    index = tmp_path / "other.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1_000_000_000}}))
    code, out, _ = size(capsys, "--config", config_file(QWEN2_5_0_5B), "--safetensors-index", str(index), "--json")
    assert json.loads(out)["weights_bytes"] == 1_000_000_000


@pytest.mark.parametrize("config, extra, error", [
    ({**LLAMA_3_1_8B, "num_attention_heads": None}, [], "lacks num_attention_heads"),
    ("{not json", [], "is not JSON"),
    (LLAMA_3_1_8B, ["--max-model-len", "999999999"], "outside 1..131072"),
    (LLAMA_3_1_8B, ["--concurrency", "0"], "concurrency must be at least 1"),
    (LLAMA_3_1_8B, ["--node-selector", "pool"], "not key=value"),
    (LLAMA_3_1_8B, ["--pools", "/nonexistent/pools.yaml"], "cannot read pools file"),
    (LLAMA_3_1_8B, ["--kubeconfig", "/nonexistent/kubeconfig"], "kubeconfig"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(capsys, tmp_path, config, extra, error):
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    code, out, err = size(capsys, "--config", str(path), *extra)
    assert code == 2 and out == ""
    assert err.startswith("slmfleet size: error: ") and error in err and "Traceback" not in err


def test_a_missing_config_file_exits_2(capsys, tmp_path):
    code, _, err = size(capsys, "--config", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read" in err


def test_a_bad_pools_file_exits_2(capsys, config_file, tmp_path):
    pools = tmp_path / "pools.yaml"
    pools.write_text("pools: [{name: Bad_Name}]")
    code, _, err = size(capsys, "--config", config_file(QWEN2_5_0_5B), "--pools", str(pools))
    assert code == 2 and "DNS label" in err


class FakeApiServer(BaseHTTPRequestHandler):
    """Serves GET /api/v1/nodes and /api/v1/pods in pages of one item, like a paginating API server."""

    nodes: list = []
    pods: list = []
    seen: list = []

    def do_GET(self):  # the http.server hook
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.seen.append((url.path, query))
        items = {"/api/v1/nodes": self.nodes, "/api/v1/pods": self.pods}.get(url.path)
        if items is None:
            self.send_response(404)
            self.end_headers()
            return
        start = int(query.get("continue", ["0"])[0])
        page = items[start:start + 1]
        meta = {"continue": str(start + 1)} if start + 1 < len(items) else {}
        body = json.dumps({"kind": "List", "apiVersion": "v1", "metadata": meta, "items": page}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_cluster(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "http://127.0.0.1:{server.server_address[1]}"}}}}]
users: [{{name: tester, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: tester}}}}]
current-context: fake
""")
    FakeApiServer.seen = []
    yield kubeconfig
    server.shutdown()
    server.server_close()


def test_sizes_against_a_cluster_read_through_the_kubeconfig(capsys, config_file, fake_cluster):
    FakeApiServer.nodes = [gpu_node("l4-0", "NVIDIA-L4", 23034, 1), gpu_node("l4-1", "NVIDIA-L4", 23034, 1),
                           gpu_node("h100-0", "NVIDIA-H100-80GB-HBM3", 81559, 8)]
    FakeApiServer.pods = [gpu_pod("l4-0", 1, uid="busy"), gpu_pod("h100-0", 8, uid="full")]
    code, out, err = size(capsys, "--config", config_file(QWEN2_5_0_5B), "--kubeconfig", str(fake_cluster), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["gpu_product"] == "NVIDIA-L4" and result["nodes_with_capacity"] == 1
    assert result["fallbacks"] == []
    paths = [p for p, _ in FakeApiServer.seen]
    assert paths.count("/api/v1/nodes") == 3 and paths.count("/api/v1/pods") == 2  # every page was read
    pod_query = next(q for p, q in FakeApiServer.seen if p == "/api/v1/pods")
    assert pod_query["fieldSelector"] == ["status.phase!=Succeeded,status.phase!=Failed"]


def test_an_unreachable_cluster_exits_2(capsys, config_file, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: gone, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: gone, context: {cluster: gone, user: u}}]
current-context: gone
""")
    code, _, err = size(capsys, "--config", config_file(QWEN2_5_0_5B), "--kubeconfig", str(kubeconfig))
    assert code == 2 and "listing nodes failed" in err


def test_replicas_choose_a_class_with_room_for_all_of_them(capsys, config_file):
    config = config_file(QWEN2_5_0_5B)
    code, out, _ = size(capsys, "--config", config, "--json", "--pools", str(DEFAULT_POOLS))
    one = json.loads(out)
    assert code == 0 and one["gpu_resource"] == "nvidia.com/mig-2g.10gb"
    more = one["pods_with_room"] + 1  # one more than the slices hold
    code, out, _ = size(capsys, "--config", config, "--json", "--pools", str(DEFAULT_POOLS), "--replicas", str(more))
    many = json.loads(out)
    assert code == 0 and many["gpu_resource"] != "nvidia.com/mig-2g.10gb" and many["pods_with_room"] >= more
    assert any(f"hold all {more} replicas" in r for r in many["reasons"])
    code, out, _ = size(capsys, "--config", config, "--pools", str(DEFAULT_POOLS), "--replicas", str(more))
    assert code == 0 and f"Pods with room   {many['pods_with_room']}" in out
