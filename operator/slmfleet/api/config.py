"""The operator's own settings (not a CR): read once at start-up from a YAML file.

The keys are camelCase like every other Kubernetes-facing document (the Helm chart renders this
file into a ConfigMap). Examples: the chart's `config` values, e2e/operator-config.yaml.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from slmfleet.api.base import CRModel
from slmfleet.api.vllm_flags import extension_problem

# A reference that ends in a digest: `[registry/]repository[:tag]@sha256:<64 hex>`. Tags move;
# digests do not, and air-gapped installs mirror images by digest.
PINNED_IMAGE_PATTERN = r"^[a-z0-9][a-z0-9._:/-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?@sha256:[0-9a-f]{64}$"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A Secret's name is a DNS subdomain (RFC 1123): lowercase labels joined by dots, 253 at most.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_IMAGE_PULL_SECRETS = 16
# A vLLM flag's full name, as OperatorConfig's `tenantVllmFlags` lists them.
TENANT_FLAG_PATTERN = r"^--[a-z0-9][a-z0-9-]*$"
MAX_TENANT_VLLM_FLAGS = 64


class ConfigMapRef(CRModel):
    """A ConfigMap in a given namespace."""

    model_config = CRModel.model_config | {"extra": "forbid"}

    namespace: str = Field(max_length=63, pattern=NAMESPACE_PATTERN)
    """Its namespace (usually the operator's)."""
    name: str = Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Its name."""


# An exact host name (RFC 1123), `*.` and a domain (any name under it), or an IPv4 address.
S3_HOST_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_S3_ENDPOINT_RULES = 64


class S3EndpointRule(CRModel):
    """An S3 endpoint tenants may name in `spec.source.s3.endpoint` or an evaluation dataset's
    `s3.endpoint`; a source without an endpoint (AWS) is `s3.<region>.amazonaws.com`."""

    model_config = CRModel.model_config | {"extra": "forbid"}

    host: str = Field(max_length=253, pattern=S3_HOST_PATTERN)
    """The host: exact (`minio.storage.svc`, `10.0.0.5`) or `*.` and a domain (`*.amazonaws.com`
    matches every name under it, not the domain itself)."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """The port; any when unset."""
    allow_http: bool = False
    """Whether plain `http://` (credentials and weights unencrypted) is allowed to this host."""

    def admits(self, scheme: str, host: str, port: int) -> bool:
        if scheme == "http" and not self.allow_http:
            return False
        if self.port is not None and port != self.port:
            return False
        return host_matches(self.host, host)


def host_matches(pattern: str, host: str) -> bool:
    """`host` is `pattern`, or lies under the domain of a `*.domain` pattern (not the domain itself)."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


class LeaderElection(CRModel):
    """Lease leader election (a `coordination.k8s.io/v1` Lease), so that the operator can run as
    several replicas of which one acts. The timings are client-go's defaults; the follower takes
    over at most `leaseDurationSeconds` + `retryPeriodSeconds` after the leader stopped renewing.
    (controller/leader.py explains why the leader's writes stop before anyone else may lead.)"""

    model_config = CRModel.model_config | {"extra": "forbid"}

    enabled: bool = True
    """Whether to elect a leader; false: this process acts at once (run exactly one replica)."""
    lease_name: str = Field(default="slmfleet-operator", max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """The Lease's name."""
    lease_namespace: str | None = Field(default=None, max_length=63, pattern=NAMESPACE_PATTERN)
    """The Lease's namespace. Unset: the operator pod's own (`POD_NAMESPACE`, else its service
    account's namespace file)."""
    lease_duration_seconds: int = Field(default=15, ge=2, le=3600)
    """How long a follower waits, seeing the Lease unchanged, before it takes it."""
    renew_deadline_seconds: int = Field(default=10, ge=1, le=3600)
    """How long the leader may go without a successful renewal before it stops writing and exits;
    below leaseDurationSeconds."""
    retry_period_seconds: int = Field(default=2, ge=1, le=600)
    """How often the leader renews and a follower tries; below renewDeadlineSeconds."""

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElection:
        if not self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("renewDeadlineSeconds must be below leaseDurationSeconds")
        if not self.retry_period_seconds < self.renew_deadline_seconds:
            raise ValueError("retryPeriodSeconds must be below renewDeadlineSeconds")
        return self


class OperatorConfig(CRModel):
    """Settings of one operator installation."""

    # Unlike CRs (where the API server prunes unknown fields), this file is written by hand or by a
    # chart: a misspelt key must fail loudly instead of silently falling back to a default.
    model_config = CRModel.model_config | {"extra": "forbid"}

    vllm_image: str = Field(pattern=PINNED_IMAGE_PATTERN, max_length=512)
    """The vLLM OpenAI server image, pinned by digest (`...@sha256:<64 hex>`). There is no default:
    the digest of a tag is only known to its registry, so each release or chart sets it."""
    cpu_vllm_image: str | None = Field(default=None, pattern=PINNED_IMAGE_PATTERN, max_length=512)
    """vLLM's CPU build (its OpenAI server, `vllm serve` as ENTRYPOINT), pinned by digest, for models
    placed on CPU nodes (`resources.accelerator: cpu` or `auto`). None: no model is placed on CPUs;
    a model that asks for `cpu` is Degraded with reason `NoCpuImage`."""
    cpu_thread_binding: Literal["auto", "nobind"] = "auto"
    """`VLLM_CPU_OMP_THREADS_BIND` of CPU placements: `auto` pins vLLM's threads to the cores the pod
    may use, one per physical core, which is right where the kubelet's static CPU manager gives
    Guaranteed pods exclusive cores; `nobind` leaves placement to the kernel (`OMP_NUM_THREADS` is
    the cores requested either way), for kubelets without it."""
    loader_image: str = Field(pattern=PINNED_IMAGE_PATTERN, max_length=512)
    """slmfleet's own image, pinned by digest: its `slmfleet load` init container downloads and
    verifies the weights of every pod."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """Pull policy of the model pods' containers (vLLM and the loader). A digest never changes, so
    IfNotPresent is safe."""
    image_pull_secrets: list[Annotated[str, Field(max_length=253, pattern=SECRET_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_IMAGE_PULL_SECRETS
    )
    """Names of docker-registry Secrets every model pod pulls its images with (the vLLM and loader
    images from a private mirror). Each must exist in the model's namespace: a Secret is only
    usable by pods of its own namespace. The Helm chart passes its `imagePullSecrets` here."""
    pending_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """Pods Pending longer than this make the model move to its next fallback placement."""
    startup_timeout_seconds: int = Field(default=1800, ge=10, le=86400)
    """How long the startup probe waits for vLLM to load weights and open its port."""
    namespaces: list[Annotated[str, Field(max_length=63, pattern=NAMESPACE_PATTERN)]] = Field(default_factory=list)
    """Namespaces to watch; empty watches all of them."""
    vllm_port: int = Field(default=8000, ge=1024, le=65535)
    """Port vLLM listens on inside the pod and the Services expose (above 1024: pods run as non-root)."""
    workers: int = Field(default=4, ge=1, le=64)
    """How many models are reconciled at once (one model is never reconciled twice at once)."""
    worker_stall_seconds: int = Field(default=300, ge=10, le=86400)
    """/healthz turns unhealthy when models wait and no reconcile has finished for this long, so
    that a hung operator is restarted by its liveness probe."""
    resync_seconds: int = Field(default=300, ge=5, le=86400)
    """How often the operator lists everything it watches and drops what its watches missed the
    deletion of (a watch that expired with 410 Gone, an API server restart). The first listing makes
    its view complete before any model is reconciled."""
    s3_endpoints: list[S3EndpointRule] = Field(default_factory=list, max_length=MAX_S3_ENDPOINT_RULES)
    """The S3 endpoints tenants may use, for weights and evaluation datasets. Any other endpoint
    is refused before a connection is made (`EndpointNotAllowed`); empty: no S3 source is allowed.
    A Secret given as S3 credentials must also carry the label `slmfleet.io/s3-credentials: "true"`,
    and may narrow the hosts it is sent to with the annotation `slmfleet.io/s3-endpoints`
    (comma-separated hosts or `*.domain` patterns). Only its keys `AWS_ACCESS_KEY_ID` and
    `AWS_SECRET_ACCESS_KEY` are read as credentials, and those it lists in the annotation
    `slmfleet.io/s3-credential-keys` (comma-separated)."""
    deprecations: ConfigMapRef | None = None
    """The ConfigMap listing deprecated base models (key `deprecations.yaml`; the Helm chart owns it).
    A model whose base is listed rolls back to its newest revision with a base that is not, and a
    rollout to a listed base is refused. None: nothing is deprecated."""
    tenant_vllm_flags: list[Annotated[str, Field(max_length=64, pattern=TENANT_FLAG_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_TENANT_VLLM_FLAGS
    )
    """vLLM flags tenants may pass in a SmallModel's `spec.serving.extraArgs` beyond the built-in
    allow-list (see `kubectl explain smallmodel.spec.serving.extraArgs`), full names such as
    `--enable-lora`. A flag the operator manages or that no tenant may set (the ones the CRD refuses,
    or a beginning of one) is refused here. A model with any other flag is Degraded (`ExtraArgsRefused`)."""
    leader_election: LeaderElection = Field(default_factory=LeaderElection)
    """Lease leader election between the operator's replicas: only the leader reconciles and writes."""

    @field_validator("tenant_vllm_flags")
    @classmethod
    def _allowable_flags(cls, flags: list[str]) -> list[str]:
        problems = [f"{flag}: {problem}" for flag in flags if (problem := extension_problem(flag)) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return flags


def parse_operator_config(text: str) -> OperatorConfig:
    """The config from a YAML document (the file's contents; reading it is the caller's I/O)."""
    loaded = yaml.safe_load(text)
    return OperatorConfig.model_validate({} if loaded is None else loaded)


# Settings the Helm chart computes itself instead of taking them from its `config:` values: the
# image references (one `imageRegistry` plus repository, tag and digest per image), the pull
# secrets (the chart's `imagePullSecrets`, which the operator's own pod uses too), the watched
# namespaces (`watchNamespaces`, which the RBAC follows) and the deprecations ConfigMap (rendered
# from the `deprecations` value).
CHART_COMPUTED_FIELDS = ("vllmImage", "cpuVllmImage", "loaderImage", "imagePullSecrets", "namespaces", "deprecations")


def chart_values_schema() -> dict[str, Any]:
    """The JSON Schema of the Helm chart's `config:` values: OperatorConfig without the fields the
    chart computes. `slmfleet chart` writes it into charts/slmfleet/values.schema.json, so a value
    the operator would refuse at start-up is refused by `helm install` already."""
    raw = OperatorConfig.model_json_schema(by_alias=True, mode="validation")
    schema = _plain_json_schema(raw, raw.get("$defs", {}))
    properties = {k: v for k, v in schema["properties"].items() if k not in CHART_COMPUTED_FIELDS}
    out: dict[str, Any] = {
        "type": "object",
        "description": "Operator settings (api/config.py: OperatorConfig) rendered into the operator's "
        "config file. Generated by `make chart-schema`; images, pull secrets, namespaces and the "
        "deprecations ConfigMap come from their own values.",
        "additionalProperties": False,
        "properties": properties,
    }
    required = [r for r in schema.get("required", []) if r not in CHART_COMPUTED_FIELDS]
    if required:
        out["required"] = required
    return out


def _plain_json_schema(node: Any, defs: dict[str, Any]) -> Any:
    """pydantic's schema with references inlined, titles dropped and descriptions on one line."""
    if isinstance(node, list):
        return [_plain_json_schema(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "description":
            out[key] = " ".join(value.split())
        elif key == "properties":
            out[key] = {name: _plain_json_schema(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _plain_json_schema(value, defs)
    return out
