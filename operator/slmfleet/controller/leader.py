"""Lease leader election: of the operator's replicas, one leads and writes; the others follow.

A follower keeps its watches and its stores (the event handlers and the full listings only
read) and serves /healthz and /metrics, but its workers, its deprecations poller and everything they start wait
for leadership, so it reconciles nothing and writes nothing; taking over needs no cache warm-up.

The protocol is client-go's (k8s.io/client-go/tools/leaderelection) on a `coordination.k8s.io/v1`
Lease, with its standard timings (OperatorConfig.leaderElection: leaseDuration 15 s, renewDeadline
10 s, retryPeriod 2 s):
- Every retryPeriod each replica reads the Lease. A follower notes, on its own monotonic clock,
  when it first saw the current record (holder, renew time, ...); it may take the Lease only once
  the record is unchanged for the record's leaseDuration, or at once when nobody holds it
  (released, or no Lease yet). `may_take` is that decision, pure.
- Taking and renewing are updates carrying the resourceVersion that was read: the API server
  refuses (409) an update over a record that changed since, so of two replicas that decide to
  take the Lease at once exactly one wins, and a follower can never overwrite a renewal it has not
  seen.

Safety by construction: the write fence. Every write the operator makes goes through KubeClient,
and KubeClient asks `Election.may_write` on the API thread right before it sends a write (apply,
delete, status, Event); a refused write raises NotLeading and sends nothing. `may_write` is true
only while

    now (monotonic) < start of the last successful acquire/renew request + renewDeadline.

Why that suffices. Say our last successful renew request started at T. Another replica can lead
only after it updated the Lease over the record it observed unchanged for leaseDuration (a later
renewal of ours would make its update a 409). It can observe a record we wrote at T only after the
API server stored it, hence after T; so it may lead at the earliest at T + leaseDuration, while
our fence closed at T + renewDeadline. Our writes stop at least leaseDuration - renewDeadline
(5 s by default) before anyone else may write. (A record we wrote before T is older still, and
the argument holds a fortiori.)

What the margin covers: writes in flight. A write that passed the fence just before it closed is
still on the wire or in the API server; the margin gives it 5 s to land before the next leader
may act. Its limits, the same as client-go's (Kubernetes has no fencing token the API server would
check on every write): it assumes the two replicas' monotonic clocks run at about the same rate
(a follower's clock running more than a third fast would shrink 15 s to under 10), and that a
write that passed the fence is sent within the margin. A process frozen (SIGSTOP, a VM pause)
between the fence check and the send, or a request held longer than 5 s on its way to the API
server (our read timeout is 30 s), can still land after the new leader started. The operator's
writes are idempotent server-side applies and whole-status writes derived from status, so such a
late write is overwritten on the new leader's next reconcile rather than acted on.

Losing the Lease is fatal, as client-go's OnStoppedLeading is in its controllers: when renewals
fail until the fence closes, or another holder is seen, `run` raises LeadershipLost and the
process exits non-zero; restarted, it comes back as a follower with clean memory (no half-done
state of a term that ended). On SIGTERM a leader closes its fence and releases the Lease (holder
empty, leaseDuration 1 s) so that the other replica takes over at its next retry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from slmfleet.api.config import LeaderElection
from slmfleet.controller import metrics
from slmfleet.k8s.client import KubeClient
from slmfleet.k8s.lease import LeaseClient, LeaseConflict, LeaseRecord, micro_time

log = logging.getLogger("slmfleet.leader")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class LeadershipLost(Exception):
    """This replica led and no longer may: the process must end (non-zero) and start again."""


class NoLeaseNamespace(Exception):
    """leaderElection.leaseNamespace is unset and the pod's namespace is unknown."""


def identity() -> str:
    """hostname_pid_random: unique per process, even for two processes on one host."""
    return f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(4)}"


def lease_namespace(config: LeaderElection, env: dict[str, str] | None = None,
                    service_account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The configured namespace, else POD_NAMESPACE, else the pod's service account's namespace."""
    if config.lease_namespace:
        return config.lease_namespace
    env = dict(os.environ) if env is None else env
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        found = service_account_file.read_text().strip()
    except OSError:
        found = ""
    if not found:
        raise NoLeaseNamespace("leaderElection.leaseNamespace is not set, and neither POD_NAMESPACE nor "
                               f"{service_account_file} says the pod's namespace")
    return found


# ------------------------------------------------------------------ the pure decision


@dataclass(frozen=True)
class Observation:
    """The Lease record as last read (without its resourceVersion) and since when (monotonic,
    our clock) we have seen it unchanged."""

    record: LeaseRecord | None
    since: float


def _content(record: LeaseRecord | None) -> LeaseRecord | None:
    return None if record is None else replace(record, resource_version="")


def observe(previous: Observation | None, record: LeaseRecord | None, now: float) -> Observation:
    """The observation after reading `record` at `now`: the same `since` while the record is
    unchanged, `now` when it changed. `now` must be taken after the read returned."""
    if previous is not None and _content(previous.record) == _content(record):
        return previous
    return Observation(record, now)


def may_take(record: LeaseRecord | None, me: str, observed_since: float, now: float) -> bool:
    """Whether `me` may write itself into the Lease as holder, given the `record` read, the time it
    has been seen unchanged since (`observed_since`) and `now`, all on this process's monotonic
    clock: when there is no Lease, nobody holds it, `me` holds it (a renewal), or the holder let it
    sit unchanged for its whole leaseDuration."""
    if record is None or not record.holder or record.holder == me:
        return True
    return now - observed_since >= record.lease_duration_seconds


def fence_open(last_renew_started: float | None, renew_deadline: float, now: float) -> bool:
    """The write fence: open until renewDeadline after the start of the last successful
    acquire/renew request (see the module's docstring for why that is safe)."""
    return last_renew_started is not None and now < last_renew_started + renew_deadline


def next_record(record: LeaseRecord | None, me: str, lease_duration: int, now_wall: dt.datetime) -> LeaseRecord:
    """The record `me` writes to take or renew the Lease (at `record`'s resourceVersion)."""
    stamp = micro_time(now_wall)
    if record is not None and record.holder == me:
        return replace(record, lease_duration_seconds=lease_duration, renew_time=stamp)
    transitions = 0 if record is None else record.transitions + (1 if record.holder else 0)
    return LeaseRecord(holder=me, lease_duration_seconds=lease_duration, acquire_time=stamp, renew_time=stamp,
                       transitions=transitions, resource_version="" if record is None else record.resource_version)


# ------------------------------------------------------------------ the loop


class Election:
    """One replica's side of the election. `leading` is set once it leads; `run` returns never
    while it leads (LeadershipLost ends it)."""

    def __init__(self, config: LeaderElection, leases: LeaseClient, me: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.config = config
        self.leases = leases
        self.me = me or identity()
        self.leading = asyncio.Event()
        self._clock = clock
        self._wall = wall
        self._observed: Observation | None = None
        self._renew_started: float | None = None  # start of the last successful acquire/renew
        self._released = False
        metrics.LEADER.set(0)

    def may_write(self) -> bool:
        """The fence KubeClient checks before every write; safe to call from any thread."""
        return not self._released and fence_open(self._renew_started, self.config.renew_deadline_seconds,
                                                  self._clock())

    async def _attempt(self) -> bool:
        """One read and, if the decision allows, one take/renew. True when we hold the Lease now."""
        record = await self.leases.read()
        self._observed = observe(self._observed, record, self._clock())
        if record is not None and record.holder and record.holder != self.me and self.leading.is_set():
            raise LeadershipLost(f"lease {self.leases.namespace}/{self.leases.name} is held by {record.holder}")
        if not may_take(record, self.me, self._observed.since, self._clock()):
            return False
        started = self._clock()
        wanted = next_record(record, self.me, self.config.lease_duration_seconds, self._wall())
        try:
            written = await (self.leases.create(wanted) if record is None else self.leases.update(wanted))
        except LeaseConflict as exc:
            log.info("%s", exc)
            return False
        self._renew_started = started
        self._observed = Observation(written, self._clock())
        return True

    async def run(self) -> None:
        retry = self.config.retry_period_seconds
        log.info("leader election: %s for lease %s/%s", self.me, self.leases.namespace, self.leases.name)
        while True:  # following
            try:
                if await asyncio.wait_for(self._attempt(), timeout=self.config.renew_deadline_seconds):
                    break
            except (TimeoutError, LeaseConflict) as exc:
                log.info("could not take the lease: %s", exc or "timed out")
            except Exception as exc:  # noqa: BLE001 - an API error while following: try again
                log.warning("could not read the lease: %s", exc)
            await asyncio.sleep(retry)
        log.info("leading: %s holds lease %s/%s", self.me, self.leases.namespace, self.leases.name)
        metrics.LEADER.set(1)
        self.leading.set()
        while True:  # leading: renew every retryPeriod, for as long as the fence is open
            await asyncio.sleep(retry)
            renewed = False
            while not renewed:
                left = (self._renew_started or 0) + self.config.renew_deadline_seconds - self._clock()
                if left <= 0:
                    self._lost(f"no renewal for {self.config.renew_deadline_seconds}s")
                try:
                    renewed = await asyncio.wait_for(self._attempt(), timeout=left)
                except LeadershipLost:
                    metrics.LEADER.set(0)
                    raise
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    log.warning("could not renew the lease: %s", exc or type(exc).__name__)
                if not renewed:
                    await asyncio.sleep(min(retry, max(0.0, left)))

    def _lost(self, why: str) -> None:
        metrics.LEADER.set(0)
        raise LeadershipLost(f"lost lease {self.leases.namespace}/{self.leases.name}: {why}")

    async def release(self) -> None:
        """On shutdown: close the fence first (no write starts after this), then hand the Lease
        back (holder empty, leaseDuration 1 s) so the other replica takes it at its next retry."""
        leading = self.may_write()
        self._released = True
        metrics.LEADER.set(0)
        if not leading:
            return
        record = self._observed.record if self._observed else None
        if record is None or record.holder != self.me:
            return
        try:
            await asyncio.wait_for(self.leases.update(replace(record, holder="", lease_duration_seconds=1,
                                                              renew_time=micro_time(self._wall()))),
                                   timeout=self.config.retry_period_seconds)
            log.info("released lease %s/%s", self.leases.namespace, self.leases.name)
        except Exception as exc:  # noqa: BLE001 - the Lease then expires on its own
            log.warning("could not release the lease: %s", exc or type(exc).__name__)


def start_election(config: LeaderElection, client: KubeClient) -> Election | None:
    """The election for `client`'s writes (its fence set), or None when it is disabled."""
    if not config.enabled:
        metrics.LEADER.set(1)
        return None
    election = Election(config, LeaseClient(client, lease_namespace(config), config.lease_name))
    client.may_write = election.may_write
    return election
