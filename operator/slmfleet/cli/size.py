"""`slmfleet size`: how much GPU memory a model needs and where it would run.

Reads a Hugging Face config.json, optionally the exact weight bytes from a safetensors index,
and sizes against a pools file, the current cluster, or nothing (memory figures only).
Exit status: 0 placed (or no inventory given), 1 nothing fits, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from slmfleet.sizing import (
    Inventory,
    ModelArchitecture,
    Placement,
    SizingInputError,
    SizingRequest,
    SizingResult,
    inventory_from_nodes,
    plan_placement,
    weights_bytes_from_safetensors_index,
)
from slmfleet.sizing.memory import GIB, KV_CACHE_DTYPES, QUANTIZATIONS, SERVING_DTYPES
from slmfleet.sizing.placement import DEFAULT_CONCURRENCY, target_result
from slmfleet.sizing.pools import PoolsError, ready_nodes_from_pools_doc

EXIT_PLACED, EXIT_NO_FIT, EXIT_BAD_INPUT = 0, 1, 2
INDEX_FILE = "model.safetensors.index.json"


class BadInput(Exception):
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("size", help="size a model's GPU memory and place it on a fleet",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, type=Path,
                   help="the model's config.json (or its directory, which may also hold model.safetensors.index.json)")
    p.add_argument("--dtype", choices=SERVING_DTYPES, default="auto")
    p.add_argument("--quantization", choices=QUANTIZATIONS)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    p.add_argument("--max-model-len", type=int, help="required context; default: flexible, up to 32768")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="concurrent sequences (max_num_seqs)")
    p.add_argument("--gpu-products", default="", help="allowed products or resources, comma-separated")
    p.add_argument("--gpu-count", type=int, help="exact number of GPUs (the tensor parallel size)")
    p.add_argument("--no-mig", action="store_true", help="never place on MIG slices")
    p.add_argument("--max-gpu-memory-utilization", type=float, default=0.95)
    p.add_argument("--node-selector", default="", help="only nodes with these labels: key=value,key=value")
    p.add_argument("--accelerator", choices=("gpu", "cpu", "auto"), default="gpu",
                   help="gpu; cpu (vLLM's CPU backend on nodes without GPUs); auto (GPUs first, then CPU nodes)")
    p.add_argument("--cpu-cores", type=int, help="cores per replica on a CPU placement (default: 4, or the most a node has free)")
    p.add_argument("--replicas", type=int, default=1,
                   help="pods to find room for: a device class with free room for all of them ranks first")
    p.add_argument("--safetensors-index", type=Path, help=f"{INDEX_FILE} for the exact weight bytes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--pools", type=Path, help="size against the fleet of a pools file (e2e/pools/*.yaml)")
    where.add_argument("--kubeconfig", nargs="?", const="", metavar="PATH",
                       help="size against a cluster (no PATH: the default kubeconfig)")
    where.add_argument("--cluster", action="store_true", help="size against the current kubeconfig's cluster")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
        inventory = _inventory(args)
    except (BadInput, SizingInputError, PoolsError) as exc:
        print(f"slmfleet size: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = target_result(request) if inventory is None else plan_placement(request, inventory)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(render(result, inventory is not None))
    if inventory is not None and result.placement is None:
        return EXIT_NO_FIT
    return EXIT_PLACED


def _request(args: argparse.Namespace) -> SizingRequest:
    config_path = args.config / "config.json" if args.config.is_dir() else args.config
    arch = ModelArchitecture.from_hf_config(_read_json(config_path))
    index = args.safetensors_index
    if index is None and args.config.is_dir() and (args.config / INDEX_FILE).is_file():
        index = args.config / INDEX_FILE
    return SizingRequest(
        architecture=arch,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        concurrency=args.concurrency,
        allowed_products=tuple(p.strip() for p in args.gpu_products.split(",") if p.strip()),
        gpu_count=args.gpu_count,
        allow_mig=not args.no_mig,
        max_gpu_memory_utilization=args.max_gpu_memory_utilization,
        node_selector=_selector(args.node_selector),
        accelerator=args.accelerator,
        cpu_cores=args.cpu_cores,
        replicas=args.replicas,
        exact_weights_bytes=weights_bytes_from_safetensors_index(_read_json(index)) if index else None,
    )


def _inventory(args: argparse.Namespace) -> Inventory | None:
    if args.pools:
        try:
            doc = yaml.safe_load(args.pools.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise BadInput(f"cannot read pools file {args.pools}: {exc}") from exc
        return inventory_from_nodes(ready_nodes_from_pools_doc(doc, str(args.pools)), [])
    if args.cluster or args.kubeconfig is not None:
        # Imported only when asked for: it loads the Kubernetes client.
        from slmfleet.k8s.inventory import ClusterReadError, list_nodes_and_pods

        try:
            nodes, pods = list_nodes_and_pods(args.kubeconfig or None)
        except ClusterReadError as exc:
            raise BadInput(str(exc)) from exc
        return inventory_from_nodes(nodes, pods)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not JSON: {exc}") from exc


def _selector(text: str) -> dict[str, str]:
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"node selector entry {pair!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def render(result: SizingResult, with_inventory: bool) -> str:
    p = result.profile
    o = p.overhead
    rows = [
        ("Parameters", f"{p.parameter_count:,} ({p.dtype}{', ' + p.quantization if p.quantization else ''})"),
        ("Weights", f"{_gib(p.weights_bytes)} ({'exact' if p.weights_exact else 'estimated'})"),
        ("KV per token", f"{p.kv_bytes_per_token:,} bytes ({p.kv_cache_dtype})"),
        ("KV cache", f"{_gib(p.kv_cache_bytes)} at {p.max_model_len} tokens × {p.max_num_seqs} sequences"),
        ("Overhead", f"{_gib(p.overhead_bytes)} per device (runtime {_gib(o.runtime_bytes)}, activations "
                     f"{_gib(o.activation_bytes)}, logits {_gib(o.logits_bytes)}, CUDA graphs {_gib(o.cuda_graph_bytes)})"),
        ("Total", f"{_gib(p.total_bytes)}" + (f" ({_gib(p.per_device_bytes)} per device, TP={p.tensor_parallel_size})"
                                              if p.tensor_parallel_size > 1 else "")),
    ]
    pl = result.placement
    if pl and pl.accelerator == "cpu":
        rows[4] = ("Overhead", f"{_gib(p.overhead_bytes)} (vLLM CPU runtime {_gib(o.runtime_bytes)}, activations "
                               f"{_gib(o.activation_bytes)}, logits {_gib(o.logits_bytes)})")
        rows += [
            ("Placement", f"vLLM CPU backend, {pl.gpu_count} cores of {pl.gpu_product} "
                          f"({_gib(pl.device_memory_bytes)} nodes)"),
            ("Dtype", pl.dtype),
            ("Pod memory", f"{_gib(pl.memory_bytes)} (request = limit)"),
            ("KV cache space", f"{pl.kv_cache_gib} GiB (VLLM_CPU_KVCACHE_SPACE)"),
            ("Max context", str(pl.max_model_len)),
            ("Max seqs", str(pl.max_num_seqs)),
            ("Node selector", ", ".join(f"{k}={v}" for k, v in sorted(pl.node_selector.items()))),
            ("Nodes with room", str(pl.nodes_with_capacity)),
            ("Pods with room", str(pl.pods_with_room)),
        ]
    elif pl:
        rows += [
            ("Placement", f"{pl.gpu_count}× {pl.gpu_product} ({pl.gpu_resource}, {_gib(pl.device_memory_bytes)} each)"),
            ("Tensor parallel", str(pl.tensor_parallel_size)),
            ("GPU mem util", f"{pl.gpu_memory_utilization:.2f}"),
            ("Max context", str(pl.max_model_len)),
            ("Max seqs", str(pl.max_num_seqs)),
            ("Batched tokens", str(pl.max_num_batched_tokens)),
            ("Node selector", ", ".join(f"{k}={v}" for k, v in sorted(pl.node_selector.items()))),
            ("Nodes with room", str(pl.nodes_with_capacity)),
            ("Pods with room", str(pl.pods_with_room)),
        ]
    elif with_inventory:
        rows.append(("Placement", "none fits"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if result.message:
        lines += ["", f"No placement: {result.message}"]
    lines += ["", "Reasons:", *(f"  - {r}" for r in result.reasons)]
    if result.fallbacks:
        lines += ["", "Fallbacks (if pods stay Pending):"]
        lines += [f"  {i}. {_fallback_line(f)}" for i, f in enumerate(result.fallbacks, 1)]
    return "\n".join(lines)


def _fallback_line(f: Placement) -> str:
    if f.accelerator == "cpu":
        return f"vLLM CPU backend, {f.gpu_count} cores of {f.gpu_product}, {f.dtype}, context {f.max_model_len}"
    return f"{f.gpu_count}× {f.gpu_product} ({f.gpu_resource}), util {f.gpu_memory_utilization:.2f}, context {f.max_model_len}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
