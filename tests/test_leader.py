"""Leader election without a cluster: the pure decision, the write fence, and two elections
sharing an in-memory Lease with optimistic concurrency (controller/leader.py explains the fence)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmfleet.api.config import LeaderElection, OperatorConfig
from slmfleet.controller import leader, main, metrics
from slmfleet.controller.leader import (
    Election,
    LeadershipLost,
    NoLeaseNamespace,
    Observation,
    fence_open,
    lease_namespace,
    may_take,
    next_record,
    observe,
)
from slmfleet.k8s.client import KubeClient, NotLeading
from slmfleet.k8s.lease import LeaseConflict, LeaseRecord
from tests.test_k8s_client import kubeconfig, silent_listener

HELD = LeaseRecord(holder="a", lease_duration_seconds=15, acquire_time="t0", renew_time="t1", resource_version="7")
WALL = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


# ------------------------------------------------------------------ the pure decision

def test_a_free_released_or_own_lease_may_be_taken_at_once():
    assert may_take(None, "b", observed_since=100.0, now=100.0)
    assert may_take(replace(HELD, holder=""), "b", observed_since=100.0, now=100.0)
    assert may_take(HELD, "a", observed_since=100.0, now=100.0), "a renewal"


def test_another_holders_lease_only_after_it_sat_unchanged_for_its_lease_duration():
    assert not may_take(HELD, "b", observed_since=100.0, now=114.9)
    assert may_take(HELD, "b", observed_since=100.0, now=115.0)
    # The record's own duration counts (the holder wrote it), not the follower's setting.
    assert not may_take(replace(HELD, lease_duration_seconds=60), "b", observed_since=100.0, now=115.0)


def test_observing_restarts_the_clock_only_when_the_record_changes():
    first = observe(None, HELD, now=100.0)
    assert first == Observation(HELD, 100.0)
    assert observe(first, HELD, now=110.0).since == 100.0
    # A new resourceVersion alone (metadata touched) is not a renewal; a new renewTime is.
    assert observe(first, replace(HELD, resource_version="8"), now=110.0).since == 100.0
    assert observe(first, replace(HELD, renew_time="t2", resource_version="8"), now=110.0).since == 110.0
    assert observe(first, None, now=111.0).since == 111.0


def test_the_fence_is_open_only_until_renew_deadline_after_the_last_renewal_started():
    assert not fence_open(None, 10, now=0.0), "never renewed: never open"
    assert fence_open(100.0, 10, now=100.0)
    assert fence_open(100.0, 10, now=109.99)
    assert not fence_open(100.0, 10, now=110.0)


def test_next_record_keeps_a_term_and_counts_transitions():
    renewed = next_record(HELD, "a", 15, WALL)
    assert (renewed.holder, renewed.acquire_time, renewed.transitions, renewed.resource_version) == ("a", "t0", 0, "7")
    assert renewed.renew_time == "2026-11-30T12:00:00.000000Z"
    taken = next_record(HELD, "b", 15, WALL)
    assert (taken.holder, taken.acquire_time, taken.transitions, taken.resource_version) == (
        "b", "2026-11-30T12:00:00.000000Z", 1, "7")
    assert next_record(None, "b", 15, WALL).resource_version == ""


# ------------------------------------------------------------------ config

def test_leader_election_defaults_are_client_gos_and_the_order_is_checked():
    config = LeaderElection()
    assert (config.enabled, config.lease_name, config.lease_namespace) == (True, "slmfleet-operator", None)
    assert (config.lease_duration_seconds, config.renew_deadline_seconds, config.retry_period_seconds) == (15, 10, 2)
    parsed = OperatorConfig.model_validate({
        "vllmImage": "v@sha256:" + "a" * 64, "loaderImage": "l@sha256:" + "b" * 64,
        "leaderElection": {"leaseNamespace": "ops", "leaseDurationSeconds": 30, "renewDeadlineSeconds": 20}})
    assert parsed.leader_election.lease_namespace == "ops" and parsed.leader_election.renew_deadline_seconds == 20
    with pytest.raises(ValidationError, match="renewDeadlineSeconds must be below leaseDurationSeconds"):
        LeaderElection.model_validate({"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10})
    with pytest.raises(ValidationError, match="retryPeriodSeconds must be below renewDeadlineSeconds"):
        LeaderElection.model_validate({"renewDeadlineSeconds": 2, "retryPeriodSeconds": 2})
    with pytest.raises(ValidationError):
        LeaderElection.model_validate({"leaseDuration": 15})  # a misspelt key fails loudly


def test_the_lease_namespace_is_configured_or_the_pods_own(tmp_path: Path):
    sa = tmp_path / "namespace"
    assert lease_namespace(LeaderElection(lease_namespace="ops"), {"POD_NAMESPACE": "x"}, sa) == "ops"
    assert lease_namespace(LeaderElection(), {"POD_NAMESPACE": "from-env"}, sa) == "from-env"
    sa.write_text("from-file\n")
    assert lease_namespace(LeaderElection(), {}, sa) == "from-file"
    with pytest.raises(NoLeaseNamespace):
        lease_namespace(LeaderElection(), {}, tmp_path / "missing")


def test_identities_differ_between_processes_on_one_host():
    assert leader.identity() != leader.identity()


# ------------------------------------------------------------------ two elections on one Lease

class FakeLeases:
    """An in-memory Lease with the API server's optimistic concurrency (409 on a stale resourceVersion)."""

    namespace, name = "ops", "slmfleet-operator"

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.failing = False
        self.writes: list[LeaseRecord] = []

    async def read(self) -> LeaseRecord | None:
        if self.failing:
            raise OSError("API server unreachable")
        return self.record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        if self.record is not None:
            raise LeaseConflict("exists")
        return self._store(record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        if self.failing:
            raise OSError("API server unreachable")
        if self.record is None or record.resource_version != self.record.resource_version:
            raise LeaseConflict("changed")
        return self._store(record)

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        self.writes.append(self.record)
        return self.record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elections(config: LeaderElection | None = None) -> tuple[FakeLeases, Clock, Election, Election]:
    store, clock = FakeLeases(), Clock()
    config = config or LeaderElection(lease_namespace="ops")
    a = Election(config, store, me="a", clock=clock, wall=lambda: WALL + dt.timedelta(seconds=clock.now))  # type: ignore[arg-type]
    b = Election(config, store, me="b", clock=clock, wall=lambda: WALL + dt.timedelta(seconds=clock.now))  # type: ignore[arg-type]
    return store, clock, a, b


def test_one_takes_the_lease_the_other_waits_and_takes_over_only_after_the_fence_closed():
    store, clock, a, b = elections()

    async def scenario() -> None:
        assert await a._attempt() and a.may_write()
        assert not await b._attempt() and not b.may_write(), "held and renewed: the follower waits"
        # a renews every 2 s for a while; b keeps seeing new records and keeps waiting.
        for _ in range(10):
            clock.now += 2
            assert await a._attempt()
            assert not await b._attempt()
            assert a.may_write() and not b.may_write()
        # a stops renewing (frozen, partitioned, killed). Step the clock in small steps: never two writers.
        a_stopped_at = clock.now
        fence_closed = took = None
        while took is None:
            clock.now += 0.25
            if fence_closed is None and not a.may_write():
                fence_closed = clock.now
            if await b._attempt():
                took = clock.now
            assert not (a.may_write() and b.may_write())
        assert fence_closed is not None and fence_closed <= a_stopped_at + 10
        assert took - fence_closed >= 15 - 10, "the follower leads at least leaseDuration - renewDeadline later"
        assert store.record is not None and store.record.holder == "b" and store.record.transitions == 1
        # The old leader, if it wakes up, sees another holder: it has lost, and may not write.
        a.leading.set()
        with pytest.raises(LeadershipLost, match="held by b"):
            await a._attempt()
        assert not a.may_write()

    asyncio.run(scenario())


def test_of_two_replicas_deciding_at_once_exactly_one_wins():
    store, _, a, b = elections()

    async def scenario() -> None:
        await asyncio.sleep(0)
        # Both read "no holder" before either writes: the second write is refused (409 on create/update).
        read_a, read_b = await a.leases.read(), await b.leases.read()
        assert read_a is None and read_b is None
        first = await store.create(next_record(read_a, "a", 15, WALL))
        with pytest.raises(LeaseConflict):
            await store.create(next_record(read_b, "b", 15, WALL))
        with pytest.raises(LeaseConflict):
            await store.update(next_record(replace(first, resource_version="0"), "b", 15, WALL))
        results = await asyncio.gather(a._attempt(), b._attempt())
        assert results.count(True) == 1
        assert store.record is not None and store.record.holder == "a"

    asyncio.run(scenario())


def test_release_closes_the_fence_and_hands_the_lease_over_at_once():
    store, clock, a, b = elections()

    async def scenario() -> None:
        assert await a._attempt()
        a.leading.set()
        await a.release()
        assert not a.may_write()
        assert store.record is not None and store.record.holder == "" and store.record.lease_duration_seconds == 1
        assert await b._attempt(), "a released lease is taken at the next retry, without waiting"

    asyncio.run(scenario())


# The shortest valid timings, in real time (run() sleeps): a lease lost in about 2 s.
FAST = LeaderElection(lease_namespace="ops", lease_duration_seconds=3, renew_deadline_seconds=2, retry_period_seconds=1)


def leading_then(lose: Callable[[Election, FakeLeases], None], message: str) -> Election:
    """An election that leads, then `lose` happens to its Lease: run() must raise LeadershipLost."""
    store = FakeLeases()
    election = Election(FAST, store, me="a")  # type: ignore[arg-type]

    async def scenario() -> None:
        task = asyncio.create_task(election.run())
        await asyncio.wait_for(election.leading.wait(), 5)
        assert election.may_write() and metrics.LEADER._value.get() == 1
        lose(election, store)
        with pytest.raises(LeadershipLost, match=message):
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    return election


def test_a_leader_that_cannot_renew_loses_the_lease_when_its_fence_closes():
    def renewals_fail(_: Election, store: FakeLeases) -> None:
        store.failing = True

    election = leading_then(renewals_fail, "no renewal for 2s")
    assert not election.may_write() and metrics.LEADER._value.get() == 0


def test_a_leader_that_sees_another_holder_loses_the_lease():
    def taken(_: Election, store: FakeLeases) -> None:
        assert store.record is not None
        store._store(replace(store.record, holder="intruder"))

    leading_then(taken, "held by intruder")


# ------------------------------------------------------------------ the fence in the client

def test_the_client_sends_no_write_while_its_fence_is_closed(tmp_path):
    from slmfleet.k8s.client import ObjectRef

    with silent_listener() as (port, held):
        client = KubeClient(kubeconfig(tmp_path, port), request_timeout=(1.0, 1.0), may_write=lambda: False)
        ref = ObjectRef("slmfleet.io/v1alpha1", "SmallModel", "ns", "m", "uid")
        obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "ns", "name": "s"}}

        async def writes() -> None:
            with pytest.raises(NotLeading):
                await client.apply(obj)
            with pytest.raises(NotLeading):
                await client.delete(ref)
            with pytest.raises(NotLeading):
                await client.patch_status(ref, {})
            with pytest.raises(NotLeading):
                await client.post_event(ref, "Normal", "Test", "refused")

        try:
            asyncio.run(writes())
        finally:
            asyncio.run(client.close())
        assert held == [], "not even a connection was made"


def test_the_fence_is_asked_when_the_write_is_sent_not_when_it_was_queued(tmp_path):
    asked: list[bool] = []

    def may_write() -> bool:
        asked.append(True)
        return False

    client = KubeClient(kubeconfig(tmp_path, 1), may_write=may_write)
    try:
        coro = client.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "n", "name": "s"}})
        assert asked == [], "nothing asked before the call runs"
        with pytest.raises(NotLeading):
            asyncio.run(coro)
        assert asked == [True]
    finally:
        asyncio.run(client.close())


def test_a_follower_is_healthy_while_it_watches():
    from slmfleet.controller.runtime import Runtime

    runtime = Runtime(config=OperatorConfig.model_validate({"vllmImage": "v@sha256:" + "a" * 64,
                                                            "loaderImage": "l@sha256:" + "b" * 64}),
                      client=None)  # type: ignore[arg-type]
    assert runtime.workers_alive == 0
    assert main.healthy(runtime, watching=True, now=0.0, following=True), "no worker runs in a follower"
    assert not main.healthy(runtime, watching=False, now=0.0, following=True)
    assert not main.healthy(runtime, watching=True, now=0.0), "a leader needs its workers"
