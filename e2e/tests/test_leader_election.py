"""Two operator replicas on one Lease (controller/leader.py), end to end: exactly one leads, the
follower reconciles and writes nothing while a rollout runs, and when the leader is SIGKILLed
mid-rollout the follower takes the Lease after it sat unchanged for leaseDuration and finishes the
rollout without repeating a step.

Both replicas are the `slmfleet-operator` user; the audit log tells them apart by user agent,
which names the process (k8s/client.py). The measured takeover (kill -> the new leader's
`slmfleet_leader` 1, kill -> its first write) goes to bench/results/leader_takeover.json; nothing
here asserts a wall-clock time."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import pytest
import yaml

from e2e.cluster import REPO
from e2e.operator_proc import CONFIG, OperatorProcess, audit_writes
from e2e.tests.conftest import PENDING_TIMEOUT
from e2e.tests.test_rollout import (  # noqa: F401 - `cleanup` is a fixture
    PLURAL,
    RIGHT,
    StableWatch,
    change_weights,
    cleanup,
    events_of,
    get,
    stable_under_rollout,
    wait_phase,
)
from e2e.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# Not conftest's OPERATOR_METRICS_PORT (18391) nor test_api_server_pause's 18491/18492.
REPLICA_PORTS = (18591, 18592)
BENCH_OUT = Path(os.environ.get("SLMFLEET_LEADER_BENCH_OUT", REPO / "bench" / "results" / "leader_takeover.json"))


def leader_gauge(op: OperatorProcess) -> float | None:
    try:
        return op.metrics().get("slmfleet_leader")
    except OSError:
        return None


def api_writes(op: OperatorProcess) -> float:
    return sum(v for k, v in op.metrics().items() if k.startswith("slmfleet_api_writes_total"))


def writes_by(cluster, pid: int, since_line: int = 0) -> list[dict]:
    """The operator user's writes (the audit log records no Lease traffic) sent by process `pid`."""
    _, writes = audit_writes(cluster, since_line=since_line)
    return [w for w in writes if f"(pid {pid})" in w.get("userAgent", "")]


def audit_time(entry: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))


def test_one_replica_leads_the_follower_writes_nothing_and_takes_over_mid_rollout(
        operator, cluster, s3, crs, core, apps, namespace, cleanup):  # noqa: F811
    timings = yaml.safe_load(CONFIG.read_text())["leaderElection"]
    assert (timings["leaseDurationSeconds"], timings["renewDeadlineSeconds"], timings["retryPeriodSeconds"]) == (15, 10, 2)
    operator.stop()  # SIGTERM: it releases the Lease; restarted at the end
    first = OperatorProcess(cluster, metrics_port=REPLICA_PORTS[0], pending_timeout=PENDING_TIMEOUT)
    second = OperatorProcess(cluster, metrics_port=REPLICA_PORTS[1], pending_timeout=PENDING_TIMEOUT)
    second.stops_others = False  # a second replica: leaves the first running
    try:
        first.start()
        wait_for(lambda: leader_gauge(first) == 1, 60, 0.2, "the first replica to lead")
        second.start()
        assert second.healthy(), "a follower is healthy"
        # Exactly one leads, and stays the leader while the follower retries.
        for _ in range(10):
            assert (leader_gauge(first), leader_gauge(second)) == (1, 0)
            time.sleep(0.3)
        leader, follower = first, second
        assert leader.proc is not None and follower.proc is not None

        # A rollout driven by the leader; the follower sees every event and does nothing.
        stable, _ = stable_under_rollout(
            s3, crs, core, namespace, "takeover",
            [{"evaluate": {}}, {"setWeight": 50}, {"pause": {"duration": "8s"}}, {"setWeight": 100}],
            scale_down=3)
        with StableWatch(apps, crs, namespace, "takeover", stable) as watch:
            change_weights(crs, s3, namespace, "takeover", RIGHT, seed=11, base="org/base-v1")
            caught = wait_phase(crs, namespace, "takeover", "Paused")
            assert caught["status"]["phase"] == "Paused", caught["status"]
            assert leader.reconciles() > 0 and writes_by(cluster, leader.proc.pid)
            assert follower.reconciles() == 0 and api_writes(follower) == 0
            assert writes_by(cluster, follower.proc.pid) == [], "the follower wrote"
            assert leader_gauge(follower) == 0

            mark, _ = audit_writes(cluster)
            killed_wall = dt.datetime.now(dt.UTC)
            killed = time.monotonic()
            leader.kill()  # SIGKILL: the Lease is not released; the follower must wait it out
            wait_for(lambda: leader_gauge(follower) == 1, 120, 0.1, "the follower to take over")
            took_over = time.monotonic() - killed
            done = wait_phase(crs, namespace, "takeover", timeout=240)
        assert done["status"]["phase"] == "Promoted", done["status"]
        assert watch.lowest == 1, "the stable kept its replica through the takeover"
        # No step repeated: one verdict for the one evaluate step, each weight announced at most once.
        assert [e["step"] for e in done["status"]["evaluations"]] == [0], "one verdict per evaluate step"
        wait_for(lambda: "Promoted" in [r for r, _ in events_of(core, namespace, "takeover")], 15, 0.2,
                 "Promoted event")
        weights = [m for r, m in events_of(core, namespace, "takeover") if r == "CanaryWeight"]
        assert len([m for m in weights if "-> 50%" in m]) <= 1, weights
        assert len([m for m in weights if "-> 100%" in m]) == 1, weights
        assert not [m for m in weights if "re-applying" in m], weights
        model = get(crs, namespace, PLURAL, "takeover")
        assert model["status"]["servingRevision"] == done["status"]["candidateRevision"]

        new_writes = writes_by(cluster, follower.proc.pid, since_line=mark)
        assert new_writes, "the new leader wrote"
        new_writes.sort(key=audit_time)
        first_write = audit_time(new_writes[0])
        result = {
            "what": "two operator replicas (local processes); the leader SIGKILLed mid-rollout (Paused)",
            "leaseDurationSeconds": timings["leaseDurationSeconds"],
            "renewDeadlineSeconds": timings["renewDeadlineSeconds"],
            "retryPeriodSeconds": timings["retryPeriodSeconds"],
            "kill_to_new_leader_seconds": round(took_over, 2),
            "kill_to_first_write_seconds": round((first_write - killed_wall).total_seconds(), 2),
            "first_write": f"{new_writes[0]['verb']} {new_writes[0]['objectRef'].get('resource')}",
            "bound_seconds": timings["leaseDurationSeconds"] + timings["retryPeriodSeconds"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        }
        BENCH_OUT.parent.mkdir(parents=True, exist_ok=True)
        BENCH_OUT.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        second.stop()  # SIGTERM: releases the Lease
        first.stop()
        operator.start()
