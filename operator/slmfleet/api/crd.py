"""CustomResourceDefinitions generated from the pydantic models.

pydantic's JSON Schema is close to, but not, a Kubernetes structural schema: it uses `$ref`,
`anyOf [X, null]` for optional fields and `title`s. This module rewrites it into the structural
form the API server requires (every node typed, no references), keeping descriptions, bounds,
patterns, enums and the CEL rules attached to models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from slmfleet.api import modelrollout, smallmodel

_DROP = {"title"}


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str
    priority: int = 0

    def to_wire(self) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            column["priority"] = self.priority
        return column


@dataclass(frozen=True)
class CrdSpec:
    model: type[BaseModel]
    group: str
    version: str
    kind: str
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("slmfleet",)


def _structural(node: Any, defs: dict[str, Any], *, in_status: bool) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs, in_status=in_status) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[1]]
            # A field's own description wins over its type's docstring.
            node = {**target, **node}
        else:
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"only Optional[X] unions are supported, got {options}")
            node = {**options[0], **node}
    if node.get("default", 0) is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "default" and in_status:
            continue  # status is the operator's to write; the API server must not invent values
        if key == "properties":
            out[key] = {
                name: _structural(prop, defs, in_status=in_status or name == "status") for name, prop in value.items()
            }
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs, in_status=in_status)
        elif key == "description":
            # Docstrings wrap at 100 columns; kubectl explain re-wraps text itself.
            out[key] = " ".join(value.split())
        else:
            out[key] = value
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # JSON Schema 2020 (pydantic) gives the bound itself; OpenAPI v3.0 (Kubernetes) a flag.
        if isinstance(out.get(bound), (int, float)) and not isinstance(out.get(bound), bool):
            out[limit] = out.pop(bound)
            out[bound] = True
    if out.get("additionalProperties") is True:
        # pydantic's "any object"; structural schemas say that with preserve-unknown-fields.
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in out:
        out.setdefault("type", "object")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}), in_status=False)
    schema["properties"] = {
        "apiVersion": {"type": "string", "description": "APIVersion of this representation of the object."},
        "kind": {"type": "string", "description": "Kind of the object."},
        "metadata": {"type": "object"},
        **schema["properties"],
    }
    schema["required"] = [r for r in schema.get("required", []) if r != "status"]
    return schema


def crd(spec: CrdSpec) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{spec.plural}.{spec.group}",
            "labels": {"app.kubernetes.io/part-of": "slmfleet"},
        },
        "spec": {
            "group": spec.group,
            "scope": "Namespaced",
            "names": {
                "kind": spec.kind,
                "listKind": f"{spec.kind}List",
                "plural": spec.plural,
                "singular": spec.kind.lower(),
                "shortNames": list(spec.short_names),
                "categories": list(spec.categories),
            },
            "versions": [
                {
                    "name": spec.version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_wire() for c in spec.columns],
                    "schema": {"openAPIV3Schema": openapi_schema(spec.model)},
                }
            ],
        },
    }


_READY = '.status.conditions[?(@.type=="Ready")]'

SMALLMODEL = CrdSpec(
    model=smallmodel.SmallModel,
    group=smallmodel.GROUP,
    version=smallmodel.VERSION,
    kind=smallmodel.KIND,
    plural=smallmodel.PLURAL,
    short_names=("sm",),
    columns=(
        PrinterColumn("Ready", "integer", ".status.readyReplicas", "Ready replicas of the desired revision"),
        PrinterColumn("GPU", "string", ".status.placement.summary", "GPU product x count per replica"),
        PrinterColumn("TP", "integer", ".status.placement.tensorParallelSize", "Tensor-parallel size"),
        PrinterColumn("Revision", "string", ".status.revision", "Desired revision"),
        PrinterColumn("Status", "string", f"{_READY}.reason", "Reason of the Ready condition"),
        PrinterColumn("Util", "string", ".status.placement.gpuMemoryUtilization", "--gpu-memory-utilization", 1),
        PrinterColumn("Context", "integer", ".status.placement.maxModelLen", "--max-model-len", 1),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ),
)

MODELROLLOUT = CrdSpec(
    model=modelrollout.ModelRollout,
    group=smallmodel.GROUP,
    version=smallmodel.VERSION,
    kind=modelrollout.KIND,
    plural=modelrollout.PLURAL,
    short_names=("mr",),
    columns=(
        PrinterColumn("Model", "string", ".spec.modelRef.name", "The SmallModel rolled out"),
        PrinterColumn("Phase", "string", ".status.phase", "Where the rollout is"),
        PrinterColumn("Step", "integer", ".status.currentStep", "Current step"),
        PrinterColumn("Weight", "integer", ".status.canaryWeight", "Traffic % to the candidate"),
        PrinterColumn("Stable", "string", ".status.stableRevision", "Stable revision"),
        PrinterColumn("Candidate", "string", ".status.candidateRevision", "Candidate revision"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ),
)

ALL = (SMALLMODEL, MODELROLLOUT)


class _Dumper(yaml.SafeDumper):
    """Quotes the words YAML 1.1 readers (kubectl, Go's yaml) take for booleans, such as `n`."""


_YAML11_BOOLS = {"y", "Y", "n", "N", "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"}


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "'" if value in _YAML11_BOOLS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(spec: CrdSpec) -> str:
    header = (
        "# Generated from operator/slmfleet/api by `make crds`; do not edit by hand.\n"
        "# A test fails if this file differs from what the models generate.\n"
    )
    return header + yaml.dump(crd(spec), Dumper=_Dumper, sort_keys=False, width=120)


def rendered_files() -> dict[str, str]:
    """File name under crds/ -> YAML text."""
    return {f"{spec.plural}.{spec.group}.yaml": render(spec) for spec in ALL}
