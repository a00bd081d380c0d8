"""Standard status conditions (the metav1.Condition shape), as Argo CD and kubectl expect them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slmfleet.api.base import CRModel


class Condition(CRModel):
    """One aspect of the object's state, as in metav1.Condition."""

    type: str = Field(max_length=316)
    """`Ready`, `Progressing` or `Degraded`."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(max_length=1024)
    """CamelCase machine-readable reason."""
    message: str = Field(default="", max_length=32768)
    """What a person should know, and what to do about it."""
    observed_generation: int | None = None
    """The spec generation the condition was computed for."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""


def set_condition(conditions: list[Condition] | tuple[Condition, ...], new: Condition, now: str) -> list[Condition]:
    """Conditions with `new` replacing its type; the transition time moves only if the status did."""
    out: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            out.append(old)
            continue
        replaced = True
        moved = old.status != new.status or old.last_transition_time is None
        out.append(new.model_copy(update={"last_transition_time": now if moved else old.last_transition_time}))
    if not replaced:
        out.append(new.model_copy(update={"last_transition_time": now}))
    return out


def find(conditions: list[Condition] | tuple[Condition, ...], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
