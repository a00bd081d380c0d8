"""`ModelRollout` (slmfleet.io/v1alpha1): how a SmallModel moves from its stable revision to a new
one — evaluation against the stable on the team's own cases, traffic steps, automatic rollback —
and the live state of that move. Like SmallModel, these models are the single source of the CRD.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slmfleet.api import tenant_patterns
from slmfleet.api.base import CRModel
from slmfleet.api.conditions import Condition
from slmfleet.api.smallmodel import DATA_KEY_PATTERN, S3Settings

KIND = "ModelRollout"
PLURAL = "modelrollouts"

Normalization = Literal["lowercase", "strip", "collapseWhitespace", "stripPunctuation", "removeArticles"]


def _default_normalization() -> list[Normalization]:
    return ["strip"]


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ModelRef(CRModel):
    """The SmallModel this rollout governs (same namespace)."""

    name: str = Field(max_length=63, pattern=NAME_PATTERN)
    """Name of the SmallModel."""


class EvaluateStep(CRModel):
    """Evaluate the candidate against the stable on the evaluation set at the current weight."""

    sample_size: int | None = Field(default=None, ge=10, le=100000)
    """Cases for this evaluation; defaults to evaluation.sampleSize."""


class PauseStep(CRModel):
    """Hold the current weight for a while (live metrics keep being checked)."""

    duration: str = Field(pattern=DURATION_PATTERN, max_length=32)
    """How long, e.g. `2m`, `30s`, `1h`."""


class Step(CRModel):
    """One step: exactly one of setWeight, evaluate, pause."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.setWeight), has(self.evaluate), has(self.pause)].filter(x, x).size() == 1",
                    "message": "a step has exactly one of setWeight, evaluate, pause",
                }
            ]
        }
    }

    set_weight: int | None = Field(default=None, ge=0, le=100)
    """Percentage of traffic for the candidate."""
    evaluate: EvaluateStep | None = None
    """Run an evaluation; the step passes only if the candidate holds up."""
    pause: PauseStep | None = None
    """Wait at the current weight."""


class Message(CRModel):
    """A chat message."""

    role: Literal["system", "user", "assistant"]
    """Who speaks."""
    content: str = Field(max_length=65536)
    """What is said."""


class Case(CRModel):
    """One evaluation case: chat messages or a prompt, and what a good answer looks like."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.messages) != has(self.prompt)", "message": "a case has messages or a prompt, not both"}
            ]
        }
    }

    id: str | None = Field(default=None, max_length=128)
    """Identifier (defaults to the position)."""
    messages: list[Message] | None = Field(default=None, max_length=64)
    """Chat messages, sent to /v1/chat/completions."""
    prompt: str | None = Field(default=None, max_length=65536)
    """A prompt, sent to /v1/completions."""
    expected: str = Field(max_length=65536)
    """The expectation the scorers compare with (a string; JSON for the json scorers)."""


class ConfigMapDataset(CRModel):
    """JSONL cases in a ConfigMap key."""

    name: str = Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Name of the ConfigMap."""
    key: str = Field(default="cases.jsonl", max_length=253, pattern=DATA_KEY_PATTERN)
    """Key holding the JSONL."""


class S3Dataset(CRModel):
    """A JSONL object in S3-compatible storage."""

    uri: str = Field(max_length=1024, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}/.+$")
    """`s3://bucket/key.jsonl`."""
    s3: S3Settings | None = None
    """Endpoint, region, credentials Secret and CA."""


class Dataset(CRModel):
    """Where the cases come from: exactly one of configMap, s3, inline."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.configMap), has(self.s3), has(self.inline)].filter(x, x).size() == 1",
                    "message": "a dataset has exactly one of configMap, s3, inline",
                }
            ]
        }
    }

    config_map: ConfigMapDataset | None = None
    """Cases as JSONL in a ConfigMap."""
    s3: S3Dataset | None = None
    """Cases as a JSONL object in S3."""
    inline: list[Case] | None = Field(default=None, max_length=1000)
    """Cases written in the rollout itself."""


class Scorer(CRModel):
    """How one answer is scored against the case's expectation, in [0, 1]."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "self.type != 'regex' || has(self.pattern)", "message": "a regex scorer needs pattern"},
                {"rule": "self.type != 'jsonField' || has(self.field)", "message": "a jsonField scorer needs field"},
                {"rule": "self.type != 'jsonSchema' || has(self.schema)", "message": "a jsonSchema scorer needs schema"},
            ]
        }
    }

    type: Literal["exactMatch", "contains", "regex", "jsonSchema", "jsonField"]
    """Scorer kind."""
    normalize: list[Normalization] = Field(default_factory=_default_normalization, max_length=5)
    """Normalisation applied to the answer and the expectation before comparing."""
    pattern: str | None = Field(default=None, max_length=tenant_patterns.MAX_PATTERN_LENGTH)
    """Regular expression (regex scorer) in RE2 syntax, matched in linear time: no backreferences
    or lookaround, `\\d`/`\\w`/`\\b` are ASCII; `{expected}` is replaced by the escaped expectation."""
    field: str | None = Field(default=None, max_length=256)
    """Field path in the JSON answer (jsonField scorer), e.g. `label` or `entities[0].type`."""
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """JSON Schema the answer must satisfy (jsonSchema scorer): valid for its `$schema` dialect,
    `$ref`s local only (`#...`, nothing is fetched), `pattern`s in RE2 syntax."""

    @model_validator(mode="after")
    def _tenant_patterns(self) -> Scorer:
        """A pattern RE2 cannot compile, a remote `$ref` or an invalid schema is refused when the
        rollout is parsed (the rollout is then Degraded, reason InvalidSpec), not when it is scored."""
        if self.pattern is not None:
            # `{expected}` becomes an escaped literal: any literal stands for it here.
            tenant_patterns.compile_regex(self.pattern.replace("{expected}", "x"))
        if self.schema_ is not None:
            try:
                tenant_patterns.check_schema_cached(self.schema_)
            except tenant_patterns.SchemaError as exc:
                raise ValueError(f"schema: {exc}") from None
        return self


class Thresholds(CRModel):
    """What the candidate must hold to pass an evaluation step."""

    min_score: float | None = Field(default=None, ge=0, le=1)
    """Absolute minimum mean score of the candidate."""
    margin: float = Field(default=0.03, ge=0, le=0.5)
    """Non-inferiority margin: the candidate may score at most this much below the stable. With the
    default sample size, 0.03 keeps a truly 5-points-worse candidate out (see bench/results/rollout_decision.json)."""
    max_p95_latency_seconds: float | None = Field(default=None, gt=0, le=600)
    """Largest acceptable p95 latency of the candidate."""
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    """Largest acceptable share of failed requests to the candidate."""


class Evaluation(CRModel):
    """How candidate and stable are compared: the same cases, sent to both, paired."""

    dataset: Dataset
    """The evaluation cases."""
    scorers: list[Scorer] = Field(min_length=1, max_length=8)
    """Scorers; the first decides, the others are reported."""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    """Pass criteria."""
    sample_size: int = Field(default=650, ge=10, le=100000)
    """Cases per evaluation (sampled deterministically from the dataset); early stopping often uses
    fewer. 650 gives power 0.8 for an equal candidate at margin 0.03 when revisions disagree on
    about 8% of cases; more disagreement needs more cases."""
    concurrency: int = Field(default=8, ge=1, le=256)
    """Requests in flight per revision."""
    request_timeout_seconds: float = Field(default=30, gt=0, le=600)
    """Timeout of one request."""
    confidence: float = Field(default=0.95, ge=0.5, le=0.999)
    """Confidence level of the non-inferiority test (1 - alpha)."""
    max_tokens: int = Field(default=256, ge=1, le=32768)
    """max_tokens of each request."""


class HttpRouteTraffic(CRModel):
    """Split traffic with a Gateway API HTTPRoute the operator owns."""

    parent_refs: list[dict[str, str]] = Field(min_length=1, max_length=8)
    """parentRefs of the HTTPRoute (Gateways), as in the Gateway API."""
    hostnames: list[str] = Field(default_factory=list, max_length=16)
    """Hostnames of the HTTPRoute."""


class Traffic(CRModel):
    """How the canary weight is applied."""

    http_route: HttpRouteTraffic | None = None
    """Gateway API HTTPRoute backendRef weights; without it, the replica ratio behind the model's Service."""


class ModelRolloutSpec(CRModel):
    """The policy for moving the model to a new revision."""

    model_ref: ModelRef
    """The SmallModel to roll out."""
    steps: list[Step] = Field(min_length=1, max_length=32)
    """Steps in order, e.g. evaluate, setWeight 10, evaluate, pause 2m, setWeight 50, evaluate, setWeight 100."""
    evaluation: Evaluation
    """How evaluation steps compare candidate and stable."""
    traffic: Traffic = Field(default_factory=Traffic)
    """How traffic is split."""
    scale_down_delay_seconds: int = Field(default=60, ge=0, le=86400)
    """After promotion, how long the old revision keeps running before it scales down."""


class EvaluationResult(CRModel):
    """One evaluation: stable vs candidate on the same cases, and the verdict."""

    step: int
    """Index of the evaluate step."""
    n: int
    """Paired cases evaluated (early stopping may use fewer than planned)."""
    planned: int
    """Cases planned."""
    stable_score: str
    """Mean score of the stable (decimal string)."""
    candidate_score: str
    """Mean score of the candidate."""
    difference: str
    """candidate - stable."""
    ci_low: str
    """Lower confidence bound of the difference."""
    ci_high: str
    """Upper confidence bound of the difference."""
    stable_p95_latency_seconds: str | None = None
    """p95 latency of the stable."""
    candidate_p95_latency_seconds: str | None = None
    """p95 latency of the candidate."""
    stable_error_rate: str | None = None
    """Share of failed requests to the stable."""
    candidate_error_rate: str | None = None
    """Share of failed requests to the candidate."""
    method: str
    """Statistical method of the decision."""
    verdict: Literal["Pass", "Fail"]
    """The step's verdict."""
    reason: str = ""
    """Why, in words."""


Phase = Literal["Pending", "Evaluating", "Progressing", "Paused", "Promoted", "RolledBack", "Failed"]


class ModelRolloutStatus(CRModel):
    """The live state of the rollout; everything needed to resume after an operator restart."""

    observed_generation: int | None = None
    """The spec generation this status describes."""
    phase: Phase | None = None
    """Where the rollout is."""
    current_step: int | None = None
    """Index of the current step."""
    step_started_at: str | None = None
    """When the current step started (RFC 3339)."""
    canary_weight: int | None = None
    """Traffic percentage currently sent to the candidate."""
    stable_revision: str | None = None
    """The revision serving before the rollout."""
    candidate_revision: str | None = None
    """The revision being rolled out."""
    evaluations: list[EvaluationResult] = Field(default_factory=list, max_length=64)
    """Results of the evaluation steps so far."""
    message: str | None = None
    """What is happening, in words."""
    retry: str | None = None
    """The value of the `slmfleet.io/retry` annotation last acted on: setting the annotation to a new
    value rolls a rolled-back or failed candidate out again."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """`Ready`, `Progressing`, `Degraded` with observedGeneration."""


class ModelRollout(CRModel):
    """Canary rollout of a SmallModel's new revision, gated on task evaluations."""

    spec: ModelRolloutSpec
    status: ModelRolloutStatus = Field(default_factory=ModelRolloutStatus)


