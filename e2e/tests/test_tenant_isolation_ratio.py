"""A bystander's change-to-apply latency while fifty hostile models attack the operator, against
the same bystander with no attacker, in one test (issue 13). The ratio goes to a benchmark file
(SLMFLEET_TENANT_BENCH_OUT, else build/bench/tenant_isolation.json; `python -m
bench.tenant_isolation` writes bench/results/); no wall-clock time is asserted, only that every
change was applied while the attacks ran."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from e2e.bystander import Bystander, latency_ratio
from e2e.hostile_store import Answer, HostileStore
from e2e.tests.test_concurrency import Tarpit
from e2e.tests.test_hostile_tenants import (
    CONFIG_JSON,
    CREDENTIALS_LABEL,
    MANIFEST_PATH,
    pinned,
    s3_model,
    safetensors_header_claiming,
    secret,
)
from e2e.tests.test_rollout import rollout
from e2e.tests.test_smallmodel import GROUP, PLURAL, QWEN_05B, VERSION, create, model_body
from e2e.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 12
# Between two changes: the attacked ones then sample half a minute of attacks, not only the burst
# of their creation (the quiet ones are spaced the same).
SPACING = 2.0
# Of each attack, this many models (or rollouts).
COPIES = 6


def _attack(crs, core, namespace: str, stack: ExitStack) -> dict[str, int]:
    """Creates the attackers; returns how many of each."""
    secret(core, namespace, "creds", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}, labels=CREDENTIALS_LABEL)
    secret(core, namespace, "db", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"})
    silent = Tarpit("127.0.0.1")
    stack.callback(silent.close)
    manifest, digest = pinned({"config.json": CONFIG_JSON, "model.safetensors": safetensors_header_claiming(1 << 30)})
    store = HostileStore({
        "/endless/m/slmfleet-manifest.json": Answer(endless=True),
        MANIFEST_PATH: Answer(manifest),
        "/models/qwen/config.json": Answer(CONFIG_JSON),
        "/models/qwen/model.safetensors": Answer(safetensors_header_claiming(1 << 30)),
    })
    stack.callback(store.close)
    bodies: dict[str, list[dict]] = {"silent store": [], "endless manifest": [], "huge header": [],
                                     "endpoint not allowed": [], "secret not opted in": [],
                                     "flag not allowed": [], "service collision": []}
    for i in range(COPIES):
        bodies["silent store"].append(s3_model(f"silent-{i}", f"http://127.0.0.1:{silent.port}", "creds"))
        bodies["endless manifest"].append(s3_model(f"endless-{i}", store.endpoint, "creds", uri="s3://endless/m/"))
        bodies["huge header"].append(s3_model(f"huge-{i}", store.endpoint, "creds", digest=digest))
        bodies["endpoint not allowed"].append(s3_model(f"refused-{i}", "http://127.0.0.2:9", "creds"))
        bodies["secret not opted in"].append(s3_model(f"steal-{i}", store.endpoint, "db"))
        bodies["flag not allowed"].append(model_body(f"lora-{i}", QWEN_05B, serving={"extraArgs": ["--enable-lora"]}))
        core.create_namespaced_service(namespace, {"metadata": {"name": f"taken-{i}"},
                                                   "spec": {"ports": [{"port": 80}]}})
        bodies["service collision"].append(model_body(f"taken-{i}", QWEN_05B, serving={"maxModelLen": 4096}))
    for group in bodies.values():
        for body in group:
            create(crs, namespace, body)
    for i in range(COPIES):
        create(crs, namespace, model_body(f"target-{i}", QWEN_05B, serving={"maxModelLen": 4096}))
        hurt = rollout(f"target-{i}", f"target-{i}", [{"setWeight": 50}])
        hurt["spec"]["evaluation"]["scorers"] = [{"type": "regex", "pattern": "(a+)\\1"}]
        crs.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelrollouts", hurt)
    counts = {what: len(group) for what, group in bodies.items()}
    counts["rollout with a refused scorer"] = COPIES
    wait_for(lambda: silent.open > 0, 60, 0.2, "the operator to connect to the silent store")
    return counts


def _churn(crs, namespace: str, stop: threading.Event) -> None:
    """A noisy tenant: each of its models gets a new revision every few seconds (five spec changes
    a second in all; the API server's own fairness, not the operator, limits a faster flood)."""
    length = 4096
    while not stop.is_set():
        length = 2048 if length == 4096 else 4096
        for i in range(COPIES):
            if stop.wait(0.2):
                return
            crs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, f"target-{i}",
                                               {"spec": {"serving": {"maxModelLen": length}}})


def test_a_bystander_reconciles_as_promptly_while_fifty_tenants_attack(api, operator, crs, core, alone):
    bystander = Bystander(api).start()
    try:
        quiet = bystander.changes_applied(ROUNDS, SPACING)
        stop = threading.Event()
        with ExitStack() as stack:
            started = time.monotonic()
            counts = _attack(crs, core, alone, stack)
            churn = threading.Thread(target=_churn, args=(crs, alone, stop), daemon=True)
            churn.start()
            stack.callback(churn.join)
            stack.callback(stop.set)
            # Every change is applied while the attacks run: a stalled operator fails this wait.
            attacked = bystander.changes_applied(ROUNDS, SPACING)
            attack_seconds = time.monotonic() - started
    finally:
        bystander.stop()
    ratio = latency_ratio(quiet, attacked)
    result = {
        "benchmark": "tenant_isolation",
        "what": "a bystander model's spec change -> its Deployment applied, median latency while hostile tenants "
                "attack over the same without attackers, measured in one run",
        "attackers": counts,
        "attacking_models": sum(counts.values()) + COPIES,
        "rounds": ROUNDS,
        "spacing_s": SPACING,
        "quiet_latency_s": [round(x, 3) for x in quiet],
        "attacked_latency_s": [round(x, 3) for x in attacked],
        "quiet_median_s": round(statistics.median(quiet), 3),
        "attacked_median_s": round(statistics.median(attacked), 3),
        "attacked_max_s": round(max(attacked), 3),
        "attack_window_s": round(attack_seconds, 1),
        "ratio_median_attacked_over_quiet": round(ratio, 2),
        "cpus": os.cpu_count(),
    }
    out = Path(os.environ.get("SLMFLEET_TENANT_BENCH_OUT", REPO / "build" / "bench" / "tenant_isolation.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
