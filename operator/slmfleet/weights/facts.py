"""What the operator learns about a revision's weights before any pod exists.

For S3 sources the operator reads the manifest (and refuses a digest that is not the pin),
`config.json` (checked against the manifest's hash) and the safetensors headers (ranged GETs of a
few kilobytes per file) to size the model exactly. Nothing is downloaded in full. Results are
cached by digest: the same pinned bytes always have the same facts.

The dataclass is plain data so that the pure planner (model_plan.py) can take it as input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WeightsFacts:
    digest: str
    config: Mapping[str, Any] | None = None  # config.json
    weights_bytes: int | None = None  # exact, from safetensors headers or the index
    disk_bytes: int | None = None  # every file of the manifest: what the loader writes
    files: tuple[str, ...] = ()  # the manifest's paths
    problem: str | None = None  # a condition reason: DigestMismatch, PickleRefused, WeightsUnreadable
    message: str = ""
    transient: bool = False  # worth retrying (storage unreachable), as opposed to a verdict on the bytes
    notes: tuple[str, ...] = field(default=())



@dataclass(frozen=True)
class WeightsReading:
    """The operator is reading the weights from their source for the first time: nothing is known yet."""

    message: str = "reading the manifest, config.json and the safetensors headers from the source"
