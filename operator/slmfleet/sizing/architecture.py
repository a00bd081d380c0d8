"""A decoder-only model's shape, read from its Hugging Face `config.json`.

Family differences (Qwen2's q/k/v bias, Qwen3's and Gemma3's per-head q/k norms, Gemma2/3's four
norms per layer, Gemma's tied embeddings, Gemma3's vision tower) are resolved here into plain
fields, so the parameter count is one formula for every family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload


class SizingInputError(ValueError):
    """The model description or the sizing request cannot be used; the message says why."""


KNOWN_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3")

# Gemma3's published multimodal configs leave most text fields at the Gemma3TextConfig defaults.
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
}
# SiglipVisionConfig defaults, for keys a Gemma3 vision_config omits.
_SIGLIP_DEFAULTS: dict[str, int] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
}
# Keys vLLM also accepts for the context length when max_position_embeddings is absent.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's linear weights are stored.

    `method` is the normalized kind: "awq", "gptq", "fp8", "int8" or "int4" (compressed-tensors
    integer formats); `group_size` None means one scale per output channel.
    """

    method: str
    bits: int
    group_size: int | None = None
    has_zero_point: bool = False

    @property
    def groupwise(self) -> bool:
        return self.group_size is not None and self.group_size > 0


@dataclass(frozen=True)
class VisionTower:
    """A SigLIP-style vision encoder plus the projector into the text model (Gemma3)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    num_channels: int
    projector_out: int  # the text model's hidden size


@dataclass(frozen=True)
class ModelArchitecture:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    vision: VisionTower | None = None
    quantization: Quantization | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelArchitecture:
        if not isinstance(cfg, Mapping):
            raise SizingInputError("config.json must be a JSON object")
        model_type = str(cfg.get("model_type") or "")
        if not model_type:
            raise SizingInputError("config.json has no model_type")
        notes: list[str] = []
        text: Mapping[str, Any] = cfg
        vision = None
        if model_type == "gemma3":
            text = {**_GEMMA3_TEXT_DEFAULTS, **_mapping(cfg.get("text_config"), "text_config")}
            vision = _vision_tower(_mapping(cfg.get("vision_config"), "vision_config"), _int(text, "hidden_size"))
        elif model_type == "gemma3_text":
            text = {**_GEMMA3_TEXT_DEFAULTS, **cfg}
        elif model_type not in KNOWN_FAMILIES:
            notes.append(f"model_type {model_type!r} is not a known family; parameters counted with the Llama formula")

        heads = _int(text, "num_attention_heads")
        hidden = _int(text, "hidden_size")
        kv_heads = _int(text, "num_key_value_heads", default=heads)
        head_dim = _int(text, "head_dim", default=None)
        if head_dim is None:
            if hidden % heads:
                raise SizingInputError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        if heads % kv_heads:
            raise SizingInputError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

        gemma = model_type.startswith("gemma")
        attention_bias = bool(text.get("attention_bias", False))
        raw_quantization = cfg.get("quantization_config") or text.get("quantization_config")
        quantization = quantization_from_config(raw_quantization)
        if raw_quantization and quantization is None:
            method = _mapping(raw_quantization, "quantization_config").get("quant_method")
            notes.append(f"quantization {method!r} not modelled; weights estimated at 16 bits")

        return cls(
            model_type=model_type,
            num_hidden_layers=_int(text, "num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_int(text, "vocab_size"),
            intermediate_size=_int(text, "intermediate_size"),
            tie_word_embeddings=_bool(cfg, text, "tie_word_embeddings", default=gemma),
            max_position_embeddings=_context_length(text, cfg),
            torch_dtype=_dtype(text, cfg, notes),
            # Qwen2 always has q/k/v bias and no o bias; elsewhere `attention_bias` covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(text.get("mlp_bias", False)),
            norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
            qk_norm=model_type in ("qwen3", "gemma3", "gemma3_text"),
            vision=vision,
            quantization=quantization,
            notes=tuple(notes),
        )


def quantization_from_config(raw: Any) -> Quantization | None:
    """The checkpoint's weight format from `quantization_config`, or None when unquantized or unknown."""
    if not raw:
        return None
    q = _mapping(raw, "quantization_config")
    method = str(q.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        group = int(q.get("group_size", 128))
        return Quantization(method, bits=int(q.get("bits", 4)), group_size=group if group > 0 else None,
                            has_zero_point=True)
    if method in ("fp8", "fbgemm_fp8"):
        return Quantization("fp8", bits=8)
    if method == "bitsandbytes":
        return Quantization("int4", bits=4, group_size=64) if q.get("load_in_4bit") else Quantization("int8", bits=8)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    return None


def _compressed_tensors(q: Mapping[str, Any]) -> Quantization | None:
    groups = q.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        return None
    # Every group of a published checkpoint quantizes weights alike; the first stands for all.
    weights = (groups[sorted(groups)[0]] or {}).get("weights") or {}
    bits = int(weights.get("num_bits", 8))
    if weights.get("type") == "float":
        return Quantization("fp8", bits=8)
    group = weights.get("group_size") if weights.get("strategy") == "group" else None
    method = "int4" if bits <= 4 else "int8"
    return Quantization(method, bits=bits, group_size=int(group) if group else None,
                        has_zero_point=not weights.get("symmetric", True))


def _vision_tower(raw: Mapping[str, Any], text_hidden: int) -> VisionTower:
    merged = {**_SIGLIP_DEFAULTS, **raw}
    return VisionTower(
        hidden_size=_int(merged, "hidden_size"),
        intermediate_size=_int(merged, "intermediate_size"),
        num_hidden_layers=_int(merged, "num_hidden_layers"),
        image_size=_int(merged, "image_size"),
        patch_size=_int(merged, "patch_size"),
        num_channels=_int(merged, "num_channels"),
        projector_out=text_hidden,
    )


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SizingInputError(f"{name} must be an object, not {type(value).__name__}")
    return value


_MISSING = object()


_D = TypeVar("_D")


@overload
def _int(cfg: Mapping[str, Any], key: str) -> int: ...
@overload
def _int(cfg: Mapping[str, Any], key: str, default: _D) -> int | _D: ...
def _int(cfg: Mapping[str, Any], key: str, default: object = _MISSING) -> object:
    value = cfg.get(key)
    if value is None:
        if default is _MISSING:
            raise SizingInputError(f"config.json lacks {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SizingInputError(f"config.json {key} must be a positive integer, not {value!r}")
    return value


def _bool(cfg: Mapping[str, Any], text: Mapping[str, Any], key: str, default: bool) -> bool:
    for source in (text, cfg):
        if key in source and source[key] is not None:
            return bool(source[key])
    return default


def _context_length(text: Mapping[str, Any], cfg: Mapping[str, Any]) -> int:
    for source in (text, cfg):
        for key in _CONTEXT_KEYS:
            if source.get(key) is not None:
                return _int(source, key)
    raise SizingInputError("config.json lacks max_position_embeddings")


def _dtype(text: Mapping[str, Any], cfg: Mapping[str, Any], notes: list[str]) -> str:
    # Newer transformers write "dtype"; older ones "torch_dtype".
    for source in (text, cfg):
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if value is not None:
                name = str(value).removeprefix("torch.")
                if name not in _DTYPES:
                    raise SizingInputError(f"config.json {key} {value!r} is not one of {', '.join(_DTYPES)}")
                return name
    notes.append("config.json names no dtype; assumed bfloat16")
    return "bfloat16"
