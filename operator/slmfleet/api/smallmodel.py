"""`SmallModel` (slmfleet.io/v1alpha1): one served model, what to serve and how it may be sized.

These models are the single source of the CRD (`make crds` writes crds/smallmodels.slmfleet.io.yaml):
field docstrings become `kubectl explain` text, Field constraints become OpenAPI validation, and the
`x-kubernetes-validations` entries are CEL rules for constraints that span fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from slmfleet.api.base import CRModel
from slmfleet.api.conditions import Condition
from slmfleet.api.vllm_flags import ADMITTED_BEGINNINGS, FORBIDDEN_VLLM_FLAGS, TENANT_VLLM_FLAGS

GROUP = "slmfleet.io"
VERSION = "v1alpha1"
KIND = "SmallModel"
PLURAL = "smallmodels"

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
# `org/name`, as on model hubs: spec.baseModel and the deprecations list must spell it alike.
BASE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
# A model's Deployments are named <model>-<10-char revision>, and Service names must be DNS-1035
# labels of at most 63 characters, hence the limit on SmallModel names.
MAX_NAME_LENGTH = 52
# A key of a Secret or ConfigMap, as the API server checks it.
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# The Secret keys read as S3 credentials unless the Secret lists others in its
# slmfleet.io/s3-credential-keys annotation (controller.s3_access).
DEFAULT_ACCESS_KEY_ID_KEY = "AWS_ACCESS_KEY_ID"
DEFAULT_SECRET_ACCESS_KEY_KEY = "AWS_SECRET_ACCESS_KEY"

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Accelerator = Literal["gpu", "cpu", "auto"]
CheckpointDtype = Literal["bfloat16", "float16", "float32"]
Quantization = Literal["awq", "gptq", "fp8", "int8"]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
ModelType = Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3"]

LabelValue = Annotated[str, Field(max_length=63)]


class SecretKeys(CRModel):
    """A Secret in the model's namespace holding S3 credentials."""

    name: str = Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Name of the Secret."""
    access_key_id_key: str = Field(default=DEFAULT_ACCESS_KEY_ID_KEY, max_length=253, pattern=DATA_KEY_PATTERN)
    """Key of the access key id in the Secret. A key other than `AWS_ACCESS_KEY_ID` is read only if
    the Secret lists it in its `slmfleet.io/s3-credential-keys` annotation (comma-separated)."""
    secret_access_key_key: str = Field(default=DEFAULT_SECRET_ACCESS_KEY_KEY, max_length=253,
                                       pattern=DATA_KEY_PATTERN)
    """Key of the secret access key in the Secret. A key other than `AWS_SECRET_ACCESS_KEY` is read
    only if the Secret lists it in its `slmfleet.io/s3-credential-keys` annotation (comma-separated)."""


class ConfigMapKey(CRModel):
    """A key of a ConfigMap in the model's namespace."""

    name: str = Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Name of the ConfigMap."""
    key: str = Field(default="ca.crt", max_length=253, pattern=DATA_KEY_PATTERN)
    """Key holding the PEM bundle."""


class S3Settings(CRModel):
    """How to reach S3-compatible storage (MinIO, Ceph RGW, AWS S3)."""

    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^\s/]+(/.*)?$")
    """Endpoint URL (`AWS_ENDPOINT_URL`), e.g. `https://minio.storage.svc:9000`; empty for AWS."""
    region: str = Field(default="us-east-1", max_length=64, pattern=r"^[a-z0-9-]+$")
    """Region (`AWS_DEFAULT_REGION`)."""
    credentials_secret: SecretKeys | None = None
    """Secret with the access key pair; never copied into status, Events or logs. It is used only if
    labelled `slmfleet.io/s3-credentials: "true"`; its `slmfleet.io/s3-endpoints` annotation
    (comma-separated hosts) may narrow the endpoints it is sent to."""
    ca_config_map: ConfigMapKey | None = None
    """ConfigMap with a CA bundle for a private endpoint's certificate."""
    path_style: bool = True
    """Path-style addressing (`https://endpoint/bucket/key`), as MinIO and RGW expect."""


class WeightsSource(CRModel):
    """Where the weights are and the digest that pins them."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "!has(self.s3) || self.uri.startsWith('s3://')", "message": "s3 settings need an s3:// uri"},
            ]
        }
    }

    uri: str = Field(max_length=1024, pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,62}/.*|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?)$")
    """Location of the model directory: `s3://bucket/prefix/` or `pvc://claim/path/in/volume`."""

    digest: str = Field(pattern=DIGEST_PATTERN, max_length=71)
    """`sha256:<64 hex>` digest of the weight manifest (see `slmfleet pin`). Only weights whose
    manifest has this digest are served; changing it starts a new revision."""

    s3: S3Settings | None = None
    """S3 settings for an `s3://` uri."""

    allow_pickle: bool = False
    """Allow pickle-based files (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`), which can run code when
    loaded. Off by default: only safetensors and plain files are served."""


class Architecture(CRModel):
    """Architecture facts of the model, the fields of its Hugging Face config.json (camelCased).
    Used for sizing until the weights themselves are read; later they override what the weights say."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.numAttentionHeads % self.numKeyValueHeads == 0",
                    "message": "numAttentionHeads must be a multiple of numKeyValueHeads",
                },
                {
                    "rule": "has(self.headDim) || self.hiddenSize % self.numAttentionHeads == 0",
                    "message": "hiddenSize must be a multiple of numAttentionHeads when headDim is not given",
                },
            ]
        }
    }

    model_type: ModelType
    """config.json `model_type`: the architecture family."""
    num_hidden_layers: int = Field(ge=1, le=512)
    """config.json `num_hidden_layers`: decoder layers."""
    hidden_size: int = Field(ge=64, le=65536)
    """config.json `hidden_size`."""
    num_attention_heads: int = Field(ge=1, le=1024)
    """config.json `num_attention_heads`: query heads."""
    num_key_value_heads: int = Field(ge=1, le=1024)
    """config.json `num_key_value_heads`: KV heads (equal to the query heads without grouped-query attention)."""
    head_dim: int | None = Field(default=None, ge=8, le=1024)
    """config.json `head_dim`; hiddenSize / numAttentionHeads when absent."""
    vocab_size: int = Field(ge=1, le=4194304)
    """config.json `vocab_size`."""
    intermediate_size: int = Field(ge=1, le=1048576)
    """config.json `intermediate_size`: MLP width."""
    tie_word_embeddings: bool | None = None
    """config.json `tie_word_embeddings`: the output head shares the embedding matrix (the
    family's default when absent)."""
    max_position_embeddings: int = Field(ge=128, le=4194304)
    """config.json `max_position_embeddings`: the longest context the model supports."""
    torch_dtype: CheckpointDtype | None = None
    """config.json `torch_dtype`: the dtype the checkpoint is stored in (bfloat16 when absent and
    not read from the weights). No default here, so a declared architecture never overrides what
    the weights' config.json says about fields it does not mention."""

    def to_hf_config(self) -> dict[str, Any]:
        """The same facts under config.json's own key names."""
        config = self.model_dump(exclude_none=True)
        config["architectures"] = []
        return config


EXTRA_ARGS_DESCRIPTION = (
    "Additional `vllm serve` arguments: flags (`--name`, `--name value`, `--name=value`) and their values. "
    "Tenants may set only these flags, or an abbreviation that vLLM's parser reads as exactly one of them: "
    + ", ".join(TENANT_VLLM_FLAGS)
    + ". The platform team may allow more (OperatorConfig `tenantVllmFlags`). The API server refuses the flags "
    "the operator manages and those no configuration allows, and every abbreviation of them: "
    + ", ".join(FORBIDDEN_VLLM_FLAGS)
    + ". Any other flag makes the model Degraded (reason ExtraArgsRefused) and no Deployment is made for its "
    "revision."
)


# CEL: an extraArgs element's flag name, before any `=`.
_ARG_NAME = "(a.indexOf('=') < 0 ? a : a.substring(0, a.indexOf('=')))"


class Serving(CRModel):
    """How vLLM serves the model. Changing any of these fields starts a new revision."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    # A flag's name (before any `=`) must not begin a forbidden flag: that refuses
                    # the flag and every abbreviation vLLM's parser would read as it. The full name
                    # of another flag is itself to vLLM, so those few are let through by name.
                    "rule": "!has(self.extraArgs) || self.extraArgs.all(a, !a.startsWith('--') || ["
                    + ", ".join(f"'{f}'" for f in ADMITTED_BEGINNINGS)
                    + f"].exists(e, e == {_ARG_NAME}) || !["
                    + ", ".join(f"'{f}'" for f in FORBIDDEN_VLLM_FLAGS)
                    + f"].exists(f, f.startsWith({_ARG_NAME})))",
                    "message": "extraArgs must not set, or abbreviate, flags the operator manages or that no "
                    "tenant may set (see kubectl explain smallmodel.spec.serving.extraArgs)",
                },
            ]
        }
    }

    served_model_name: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
    )
    """Name clients put in the OpenAI `model` field; defaults to the SmallModel's name."""
    max_model_len: int | None = Field(default=None, ge=256, le=1048576)
    """Context length to serve (`--max-model-len`). A hard requirement when set; when absent the
    operator serves up to the model's maximum (capped at 32768) and may shorten it to fit a GPU."""
    concurrency: int = Field(default=8, ge=1, le=1024)
    """Expected concurrent sequences per replica; sets `--max-num-seqs` and the KV cache to reserve."""
    dtype: Dtype = "auto"
    """Compute dtype (`--dtype`); `auto` uses the checkpoint's dtype on GPUs, and on CPUs bfloat16
    where the CPU computes it natively (AVX512-BF16 or AMX), else float32."""
    quantization: Quantization | None = None
    """Weight quantization of the checkpoint: `awq` or `gptq` (4-bit), `fp8`, or `int8` (W8A8 in
    compressed-tensors format)."""
    kv_cache_dtype: KvCacheDtype = "auto"
    """KV cache dtype (`--kv-cache-dtype`); fp8 halves the KV cache of a 16-bit model."""
    replicas: int = Field(default=1, ge=0, le=64)
    """vLLM replicas of the serving revision."""
    extra_args: list[Annotated[str, Field(max_length=256, pattern=r"^--[a-z0-9][a-z0-9-]*(=.*)?$|^[^-].*$")]] = Field(
        default_factory=list, max_length=32, description=EXTRA_ARGS_DESCRIPTION
    )


class Resources(CRModel):
    """Constraints on placement. Without them the operator picks the fewest, smallest GPUs that fit."""

    gpu_products: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=16)
    """Allowed GPU products, as in the `nvidia.com/gpu.product` node label (e.g. `NVIDIA-L4`);
    MIG slices of an allowed product are allowed too. Empty: any product."""
    gpu_count: int | None = Field(default=None, ge=1, le=8)
    """Exact number of GPUs (= tensor-parallel size). Empty: chosen by the operator."""
    allow_mig: bool = True
    """Whether a MIG slice may be chosen for a model that fits one."""
    max_gpu_memory_utilization: float = Field(default=0.95, ge=0.3, le=0.95)
    """Upper bound for `--gpu-memory-utilization`."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=16)
    """Extra node labels the pods require (e.g. a node pool); sizing only considers matching nodes."""
    accelerator: Accelerator = "gpu"
    """Where the model may run: `gpu` (NVIDIA GPUs), `cpu` (vLLM's CPU backend on nodes without GPUs,
    for small 16- or 32-bit models), or `auto` (GPUs first; a CPU node when no GPU placement fits,
    and as the last fallback when GPU pods stay Pending)."""
    cpu_cores: int | None = Field(default=None, ge=1, le=128)
    """Cores per replica on a CPU placement, requested and limited (a Guaranteed pod, which a static
    CPU manager gives whole cores). Empty: 4, or the most a CPU node has free if fewer."""


class SmallModelSpec(CRModel):
    """What to serve and how it may be sized."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.resources) || !has(self.resources.gpuCount) || !has(self.architecture) || "
                    "(self.architecture.numAttentionHeads % self.resources.gpuCount == 0 && "
                    "(self.architecture.numKeyValueHeads % self.resources.gpuCount == 0 || "
                    "self.resources.gpuCount % self.architecture.numKeyValueHeads == 0))",
                    "message": "resources.gpuCount (the tensor-parallel size) must divide the attention heads "
                    "and the KV heads (or be a multiple of the KV heads)",
                },
                {
                    "rule": "!has(self.serving) || !has(self.serving.maxModelLen) || !has(self.architecture) || "
                    "self.serving.maxModelLen <= self.architecture.maxPositionEmbeddings",
                    "message": "serving.maxModelLen exceeds architecture.maxPositionEmbeddings",
                },
                {
                    "rule": "!has(self.resources) || !has(self.resources.accelerator) || "
                    "self.resources.accelerator != 'cpu' || (!has(self.resources.gpuCount) && "
                    "(!has(self.resources.gpuProducts) || size(self.resources.gpuProducts) == 0) && "
                    "(!has(self.serving) || ((!has(self.serving.quantization)) && "
                    "(!has(self.serving.kvCacheDtype) || self.serving.kvCacheDtype == 'auto') && "
                    "(!has(self.serving.dtype) || self.serving.dtype != 'float16'))))",
                    "message": "resources.accelerator cpu: gpuCount and gpuProducts do not apply, and CPUs serve "
                    "unquantized models with kvCacheDtype auto in bfloat16 or float32",
                },
                {
                    "rule": "!has(self.serving) || !has(self.serving.quantization) || !has(self.architecture) || "
                    "self.serving.quantization == 'fp8' || self.architecture.torchDtype != 'float32'",
                    "message": "awq, gptq and int8 checkpoints are stored in 16-bit, not float32",
                },
            ]
        }
    }

    source: WeightsSource
    """The weights: location and pinned manifest digest."""
    base_model: str | None = Field(
        default=None, max_length=256, pattern=BASE_MODEL_PATTERN
    )
    """Upstream base model this one derives from (`org/name`, e.g. `Qwen/Qwen3-4B`), for deprecation."""
    architecture: Architecture | None = None
    """Declared architecture facts (config.json fields), used for sizing."""
    serving: Serving = Field(default_factory=Serving)
    """How vLLM serves the model."""
    resources: Resources = Field(default_factory=Resources)
    """Placement constraints; absent means the operator sizes on its own."""


class MemoryBreakdown(CRModel):
    """Device memory the model needs at the chosen settings, in bytes (all devices together)."""

    weights_bytes: int
    """Weights as loaded."""
    kv_bytes_per_token: int
    """KV cache per token: 2 × layers × KV heads × head_dim × KV dtype bytes."""
    kv_cache_bytes: int
    """KV cache reserved for maxModelLen × maxNumSeqs tokens."""
    overhead_bytes: int
    """Activations, CUDA graphs and runtime, per the documented overhead model."""
    total_bytes: int
    """Sum of the above."""


class Placement(CRModel):
    """The hardware chosen for the model and the vLLM settings that follow from it."""

    accelerator: Literal["gpu", "cpu"] = "gpu"
    """`gpu`, or `cpu` for vLLM's CPU backend on a node without GPUs."""
    gpu_resource: str
    """Resource requested per replica: `nvidia.com/gpu`, a MIG slice such as `nvidia.com/mig-3g.20gb`,
    or `cpu` on a CPU placement."""
    gpu_product: str
    """GPU product (for a MIG slice, the slice's product label); on a CPU placement `CPU-BF16` (a CPU
    with native bfloat16) or `CPU`."""
    gpu_count: int
    """Devices per replica; cores on a CPU placement."""
    tensor_parallel_size: int
    """`--tensor-parallel-size` (equal to gpuCount)."""
    gpu_memory_utilization: str
    """`--gpu-memory-utilization`, as a decimal string (e.g. "0.87")."""
    max_model_len: int
    """`--max-model-len`."""
    max_num_seqs: int
    """`--max-num-seqs`."""
    max_num_batched_tokens: int | None = None
    """`--max-num-batched-tokens`: the per-step token budget the activation memory was sized for."""
    device_memory_bytes: int
    """Memory of one device; on a CPU placement, of the smallest node of its class."""
    memory_bytes: int | None = None
    """CPU placement: the pod's memory request and limit (weights + KV cache + runtime)."""
    kv_cache_gib: int | None = None
    """CPU placement: `VLLM_CPU_KVCACHE_SPACE`, the KV cache vLLM's CPU backend allocates, in GiB."""
    dtype: str | None = None
    """CPU placement: the `--dtype` it serves at (bfloat16 on CPUs that compute it natively)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods require."""
    memory: MemoryBreakdown | None = None
    """What the model needs, in bytes."""
    summary: str = ""
    """`<product> x<count>`, for `kubectl get`."""
    reasons: list[str] = Field(default_factory=list)
    """Why this placement was chosen."""

    @property
    def key(self) -> str:
        return f"{self.gpu_resource}|{self.gpu_product}|{self.gpu_count}"


class FallbackPlacement(CRModel):
    """A ranked alternative, used when pods stay Pending on the current placement."""

    gpu_resource: str
    gpu_product: str
    gpu_count: int
    max_model_len: int


class ExcludedPlacement(CRModel):
    """A placement given up on because its pods stayed Pending too long."""

    key: str
    """`<resource>|<product>|<count>`."""
    reason: str
    """Why it was given up."""


class RevisionRecord(CRModel):
    """A revision the model has served, and how its time ended."""

    revision: str
    """The revision hash."""
    digest: str
    """The weights digest it served."""
    uri: str | None = None
    """spec.source.uri at the time: with the digest, what a rollback to this revision loads."""
    base_model: str | None = None
    """spec.baseModel at the time."""
    outcome: Literal["Serving", "Replaced", "Promoted", "RolledBack"]
    """Serving now, replaced by a newer revision, promoted by a rollout (it passed its evaluations), or
    rolled back by one (it never became stable)."""
    since: str
    """When it started serving (RFC 3339)."""


MAX_HISTORY = 10


class SmallModelStatus(CRModel):
    """What the operator decided and observed. Written only by the operator; never part of the spec."""

    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """`Ready`, `Progressing` and `Degraded`, each with observedGeneration."""
    revision: str | None = None
    """Revision desired by the spec: a hash of the weights digest and the pod-changing serving config."""
    serving_revision: str | None = None
    """Revision whose pods currently take traffic through the model's Service."""
    placement: Placement | None = None
    """Where the model runs and why."""
    fallbacks: list[FallbackPlacement] = Field(default_factory=list)
    """Ranked alternatives to the placement."""
    excluded_placements: list[ExcludedPlacement] = Field(default_factory=list)
    """Placements given up on (pods stayed Pending), until the sizing inputs change."""
    sizing_inputs: str | None = None
    """Hash of the spec fields sizing reads; the placement is kept while it is unchanged."""
    replicas: int | None = None
    """Replicas of the desired revision."""
    ready_replicas: int | None = None
    """Ready replicas of the desired revision."""
    endpoint: str | None = None
    """In-cluster URL of the model's OpenAI-compatible API."""
    history: list[RevisionRecord] = Field(default_factory=list, max_length=MAX_HISTORY)
    """Revisions that served, oldest first (the last ten): the fallbacks of a rollback."""


class SmallModel(CRModel):
    """A self-hosted small language model served by vLLM on GPUs the operator chooses."""

    model_config = CRModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                    "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
                    "(Deployments and Services are named <name>-<revision>)",
                },
                {
                    "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                    "message": "metadata.name must be a DNS-1035 label (start with a letter; it names a Service)",
                },
            ]
        }
    }

    spec: SmallModelSpec
    status: SmallModelStatus = Field(default_factory=SmallModelStatus)
