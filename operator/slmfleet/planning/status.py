"""The SmallModel's status: conditions from what its pods and Deployments say, the Events their
changes deserve, and the revision history."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from typing import Any

from slmfleet.api.conditions import Condition, find, set_condition
from slmfleet.api.smallmodel import MAX_HISTORY, RevisionRecord, SmallModelStatus
from slmfleet.api.timestamps import parse_rfc3339, rfc3339
from slmfleet.builders.labels import REVISION_LABEL
from slmfleet.builders.pod import CONTAINER_NAME
from slmfleet.builders.weights import LOADER_CONTAINER
from slmfleet.planning.common import EventNote, on_its_node
from slmfleet.weights import errors


class StatusDraft:
    """Builds the next conditions from the previous ones, moving transition times only on change."""

    def __init__(self, old: SmallModelStatus, generation: int, now: dt.datetime) -> None:
        self.generation = generation
        self.now = rfc3339(now)
        self.conditions = list(old.conditions)

    def condition(self, type_: str, status: bool | str, reason: str, message: str) -> None:
        new = Condition(
            type=type_,
            status=status if isinstance(status, str) else ("True" if status else "False"),
            reason=reason,
            message=message,
            observed_generation=self.generation,
        )
        self.conditions = set_condition(self.conditions, new, self.now)


def changed_condition_events(old: list[Condition], new: list[Condition], *, served: bool = True) -> list[EventNote]:
    """An Event for every condition that turned bad or good, or changed its reason. Events are for
    decisions and trouble: a verification that passed is no Event (the condition says it, with the
    pod and when; one that failed is a Warning), nor is the first readiness of a model that never
    `served` (its Placed Event said where it runs, and the Ready condition says since when)."""
    events = []
    degraded = find(new, "Degraded")
    for cond in new:
        before = find(old, cond.type)
        if before is not None and (before.status, before.reason) == (cond.status, cond.reason):
            continue
        if cond.type == "Degraded" and cond.status == "True":
            events.append(EventNote("Warning", cond.reason, cond.message))
        elif cond.type == "WeightsVerified" and cond.status == "False":
            if degraded is None or (degraded.status, degraded.reason) != ("True", cond.reason):
                events.append(EventNote("Warning", cond.reason, cond.message))
        elif cond.type == "Ready" and cond.status == "True" and served:
            events.append(EventNote("Normal", "Ready", cond.message))
    return events


# `slmfleet load` exit codes (weights/loader.py) -> WeightsVerified reasons.
LOADER_FAILURES = {
    errors.EXIT_DIGEST_MISMATCH: "DigestMismatch",
    errors.EXIT_FILE_MISMATCH: "FileMismatch",
    errors.EXIT_REFUSED_FORMAT: "PickleRefused",
    errors.EXIT_UNREACHABLE: "StorageUnreachable",
    errors.EXIT_SOURCE_ERROR: "StorageDenied",
}


def _revision_pods(pods: Iterable[dict[str, Any]], revision: str) -> list[dict[str, Any]]:
    return [p for p in sorted(pods, key=lambda p: p["metadata"].get("name", ""))
            if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision]


def _loader_statuses(pods: Iterable[dict[str, Any]], revision: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod, its loader init container's status) for the revision's pods."""
    for pod in _revision_pods(pods, revision):
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") == LOADER_CONTAINER:
                yield pod, status


def weights_verified(pods: Iterable[dict[str, Any]], revision: str) -> tuple[str, str, str]:
    """WeightsVerified from the loader init containers of the revision's pods: a failure anywhere
    is news (a file changed under the pin), otherwise one success is enough."""
    success = None
    for pod, status in _loader_statuses(pods, revision):
        current = (status.get("state") or {}).get("terminated")
        states = [status.get("state") or {}]
        if not (current and int(current.get("exitCode", 1)) == 0):
            states.append(status.get("lastState") or {})  # an earlier failure, not yet retried well
        for state in states:
            done = state.get("terminated")
            if not done:
                continue
            code = int(done.get("exitCode", 0))
            if code == 0:
                success = success or f"pod {pod['metadata'].get('name')} loaded and verified every file of the manifest"
            else:
                reason = LOADER_FAILURES.get(code, "LoadFailed")
                message = (done.get("message") or "").strip() or f"the loader exited with {code}"
                return "False", reason, f"pod {pod['metadata'].get('name')}: {message}"[:2000]
    if success:
        return "True", "Verified", success
    return "Unknown", "Pending", "no loader has finished yet"


def loader_finished_at(pods: Iterable[dict[str, Any]], revision: str) -> dt.datetime | None:
    """When the first of the revision's loaders that succeeded finished (None: none did, or the
    kubelet did not say when)."""
    times = []
    for _, status in _loader_statuses(pods, revision):
        done = (status.get("state") or {}).get("terminated") or {}
        if done and int(done.get("exitCode", 1)) == 0 and (finished := parse_rfc3339(done.get("finishedAt"))) is not None:
            times.append(finished)
    return min(times, default=None)


def revision_pods_ready(pods: Iterable[dict[str, Any]], revision: str) -> bool:
    """Whether the revision has pods and every one on a node, not going away, is Ready."""
    live = [p for p in _revision_pods(pods, revision) if on_its_node(p)]
    return bool(live) and all(any(c.get("type") == "Ready" and c.get("status") == "True"
                                  for c in (p.get("status") or {}).get("conditions") or []) for p in live)


# The kubelet's waiting reasons for an image it cannot get: another node would not help.
IMAGE_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName")


def image_pull_failure(pods: Iterable[dict[str, Any]], revision: str) -> str | None:
    """Which image the revision's pods cannot pull, if any. The image is the operator's own
    setting (vllmImage, loaderImage), so naming it leaks nothing of a tenant's; the registry's
    own error text stays in the pod's status. The kubelet alternates ErrImagePull and
    ImagePullBackOff while it backs off: both read as one state, so the status is not rewritten
    on every attempt."""
    for pod in _revision_pods(pods, revision):
        status = pod.get("status") or {}
        for c in (*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])):
            reason = ((c.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in IMAGE_PULL_FAILURES:
                return (f"pod {pod['metadata'].get('name')}: container {c.get('name')} cannot pull image "
                        f"{c.get('image')}; check that the registry has it by digest and the pull secrets")[:1000]
    return None


# A line of vLLM's output that says what went wrong: a Python exception (`ValueError: ...`), argparse's
# `vllm serve: error: ...`, or vLLM's own ERROR log lines.
_ERROR_LINE = re.compile(r"(^[A-Za-z_.]*(Error|Exception)\b.*:|\berror: |\bERROR\b)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_ERROR_LINE = 400


def vllm_error_line(output: str) -> str:
    """The last line of vLLM's output (the termination message: its log's tail) that names the error,
    else its last line; without colour codes or unprintable characters, and bounded."""
    lines = [_ANSI.sub("", line).strip() for line in output.splitlines()]
    lines = ["".join(ch for ch in line if ch.isprintable()) for line in lines if line]
    if not lines:
        return ""
    found = next((line for line in reversed(lines) if _ERROR_LINE.search(line)), lines[-1])
    # vLLM prefixes its engine process's lines with "(EngineCore pid=123) "; the error reads without it.
    found = re.sub(r"^\(\w+ pid=\d+\)\s*", "", found)
    return found if len(found) <= MAX_ERROR_LINE else found[:MAX_ERROR_LINE - 1] + "…"


def vllm_start_failure(pods: Iterable[dict[str, Any]], revision: str) -> str | None:
    """Why the revision's vLLM container keeps exiting, with vLLM's own error line; None while it has
    not failed (or serves: a container that is ready again is not failing)."""
    for pod in _revision_pods(pods, revision):
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            if c.get("name") != CONTAINER_NAME or c.get("ready"):
                continue
            done = ((c.get("state") or {}).get("terminated") or (c.get("lastState") or {}).get("terminated"))
            if not done or int(done.get("exitCode") or 0) == 0:
                continue
            why = " (OOMKilled: the pod's memory limit)" if done.get("reason") == "OOMKilled" else ""
            line = vllm_error_line(done.get("message") or "")
            return (f"pod {pod['metadata'].get('name')}: vLLM exited with code {done.get('exitCode')}{why}"
                    + (f": {line}" if line else ""))
    return None


def next_history(history: Iterable[RevisionRecord], record: RevisionRecord, *, promoted: bool, rolled_back: bool,
                 now_serving: bool) -> list[RevisionRecord]:
    """The history with `record`'s revision as it now stands: promoted by a rollout, rolled back
    by one, or serving after a plain replacement; the one it replaces becomes Replaced."""
    out = list(history)
    revision = record.revision
    if promoted and (not out or out[-1].revision != revision or out[-1].outcome != "Promoted"):
        out = [h.model_copy(update={"outcome": "Replaced"}) if h.outcome == "Serving" else h
               for h in out if h.revision != revision]
        out.append(record.model_copy(update={"outcome": "Promoted"}))
    elif rolled_back and not any(h.revision == revision and h.outcome == "RolledBack" for h in out):
        out = [h for h in out if h.revision != revision]
        out.append(record.model_copy(update={"outcome": "RolledBack"}))
    elif now_serving and (not out or out[-1].revision != revision):
        out = [h.model_copy(update={"outcome": "Replaced"}) if h.outcome == "Serving" else h for h in out]
        out.append(record.model_copy(update={"outcome": "Serving"}))
    return out[-MAX_HISTORY:]
