"""The vLLM flags a tenant may pass in extraArgs (api/vllm_flags.py), read as vLLM's parser reads them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from e2e.standin import vllm as standin
from slmfleet.api.config import OperatorConfig
from slmfleet.api.crd import SMALLMODEL, crd
from slmfleet.api.smallmodel import Placement, Serving
from slmfleet.api.vllm_flags import (
    ADMITTED_BEGINNINGS,
    FORBIDDEN_VLLM_FLAGS,
    MANAGED_VLLM_FLAGS,
    MAX_QUOTED_NAME,
    TENANT_VLLM_FLAGS,
    VLLM_SERVE_FLAGS,
    flag_name,
    refused_extra_args,
    resolve,
)
from slmfleet.builders import vllm_serve_args

IMAGE = "docker.io/vllm/vllm-openai:v0.32.0@sha256:" + "5" * 64
LOADER_IMAGE = "slmfleet/slmfleet:0.1.0@sha256:" + "c" * 64
LONG_FLAGS = tuple(f for f in VLLM_SERVE_FLAGS if f.startswith("--"))


def refused(*args: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    return {r.flag: r.reason for r in refused_extra_args(list(args), extra)}


# --- the abuses of issue 13 ------------------------------------------------------------------------

ABUSES = [
    (["--trust-remote-code"], "--trust-remote-code", "never allowed"),
    (["--load-format", "dummy"], "--load-format", "never allowed"),
    (["--load-format=dummy"], "--load-format", "never allowed"),
    (["--load-f=dummy"], "--load-f", "abbreviates --load-format"),
    (["--otlp-traces-endpoint", "http://collector.evil:4317"], "--otlp-traces-endpoint", "never allowed"),
    (["--otlp=http://collector.evil:4317"], "--otlp", "abbreviates --otlp-traces-endpoint"),
    (["--allowed-local-media-path", "/"], "--allowed-local-media-path", "never allowed"),
    (["--allowed-local=/var/run/secrets"], "--allowed-local", "abbreviates --allowed-local-media-path"),
    (["--api-key", "k"], "--api-key", "never allowed"),
    (["--api-k=k"], "--api-k", "abbreviates --api-key"),
    # vLLM 0.32 added --quantization-config and --kv-cache-dtype-skip-layers: these two became ambiguous.
    (["--quantiz", "gptq"], "--quantiz", "ambiguous"),
    (["--kv-cache-dt=fp8"], "--kv-cache-dt", "ambiguous"),
    (["--tensor-parallel=4"], "--tensor-parallel", "abbreviates --tensor-parallel-size, which is set by the operator"),
    (["--max-model-l=99"], "--max-model-l", "abbreviates --max-model-len, which is set by the operator"),
    (["--device-mem=0.99"], "--device-mem", "abbreviates --device-memory-utilization, which is set by the operator"),
    (["--reasoning-parser-plugin", "/tmp/p.py"], "--reasoning-parser-plugin", "never allowed"),
    (["--spec-model", "org/other"], "--spec-model", "never allowed"),
    (["--weight-transfer-config", "{}"], "--weight-transfer-config", "never allowed"),
    (["--grpc-port", "50051"], "--grpc-port", "never allowed"),
    (["--trust-remote"], "--trust-remote", "abbreviates --trust-remote-code"),
    (["--chat-template", "/etc/passwd"], "--chat-template", "never allowed"),
    (["--config", "/tmp/x.yaml"], "--config", "never allowed"),
    (["--speculative-config", "{}"], "--speculative-config", "never allowed"),
    (["--disable-log-stats"], "--disable-log-stats", "never allowed"),
    (["--enable-lora"], "--enable-lora", "not on the allow-list"),
    (["--not-a-vllm-flag"], "--not-a-vllm-flag", "not a vLLM flag"),
    (["--enable"], "--enable", "ambiguous"),
    (["-tp", "4"], "-tp", "short options"),
    (["-O3"], "-O3", "short options"),
    (["--"], "--", "ends vLLM's options"),
    (["--trust_remote_code"], "--trust_remote_code", "lowercase name"),
    (["--compilation-config.level", "3"], "--compilation-config.level", "lowercase name"),
]


@pytest.mark.parametrize("args, flag, reason", ABUSES, ids=[a[0][0] for a in ABUSES])
def test_every_abuse_is_refused_naming_the_flag(args, flag, reason):
    got = refused(*args)
    assert list(got) == [flag]
    assert reason in got[flag]


MANAGED_ABBREVIATIONS = [
    "--tensor-parallel=4", "--tensor-p", "--max-model=131072", "--gpu-memory-util=0.99", "--served-model", "--port",
    "--hos=127.0.0.1", "--max-num-se=512", "--max-num-b=65536", "--dtyp=float32", "--device-mem=0.99",
]


@pytest.mark.parametrize("arg", MANAGED_ABBREVIATIONS)
def test_managed_flags_and_their_abbreviations_are_refused(arg):
    [(flag, reason)] = refused(arg).items()
    assert flag == arg.split("=")[0]
    assert "set by the operator" in reason or "the operator sets" in reason


def test_every_flag_the_builder_emits_is_managed():
    placement = Placement.model_validate({
        "gpuResource": "nvidia.com/gpu", "gpuProduct": "NVIDIA-L4", "gpuCount": 1, "tensorParallelSize": 1,
        "gpuMemoryUtilization": "0.9", "maxModelLen": 8192, "maxNumSeqs": 8, "maxNumBatchedTokens": 8192,
        "deviceMemoryBytes": 23034 * 2**20, "nodeSelector": {}})
    serving = Serving.model_validate({"quantization": "int8", "kvCacheDtype": "fp8"})
    emitted = {a for a in vllm_serve_args("/models/m", "m", placement, serving, 8000) if a.startswith("--")}
    assert emitted <= set(MANAGED_VLLM_FLAGS)
    # The model path is positional; --device-memory-utilization is the other name of a flag it emits.
    assert set(MANAGED_VLLM_FLAGS) - emitted == {"--model", "--device-memory-utilization"}


def test_a_refusal_names_the_flag_never_its_value():
    marker = "sk-MARKER-4f1b"
    for args in (["--api-key", marker], [f"--api-key={marker}"], [f"--otlp-traces-endpoint=http://{marker}:4317"],
                 [f"--{marker.lower()}"[:20] + f"={marker}"], ["--x" * 80 + f"={marker}"]):
        for r in refused_extra_args(args):
            assert marker not in str(r)
            assert len(r.flag) <= MAX_QUOTED_NAME


def test_a_name_it_cannot_quote_is_not_quoted():
    [r] = refused_extra_args(["--caf\u00e9=1"])
    assert r.flag == "an argument"


# --- what a tenant may pass -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", TENANT_VLLM_FLAGS)
def test_every_allowed_flag_passes(flag):
    assert refused(flag) == {}
    assert refused(f"{flag}=1") == {}


def test_values_after_flags_and_negative_numbers_pass():
    args = ["--seed", "7", "--max-logprobs", "-1", "--max-logprobs=-1", "--scheduling-policy", "priority",
            "--response-role=assistant=bot", "--tool-call-parser", "hermes", "--long-prefill-token-threshold", "-.5"]
    assert refused(*args) == {}


def test_a_value_is_never_read_as_a_flag():
    # Anything not starting with "-" is a value (of the flag before it, or a stray positional vLLM
    # refuses itself), whatever it says.
    assert refused("--seed", "trust-remote-code", "--response-role", "api-key=x") == {}


@pytest.mark.parametrize("arg, flag", [
    ("--enable-prefix", "--enable-prefix-caching"),
    ("--enable-chunked", "--enable-chunked-prefill"),
    ("--no-enable-prefix-c", "--no-enable-prefix-caching"),
    ("--scheduling-pol=priority", "--scheduling-policy"),
    ("--enforce-e", "--enforce-eager"),
    ("--see=3", "--seed"),
])
def test_unambiguous_abbreviations_of_allowed_flags_pass(arg, flag):
    assert resolve(flag_name(arg), VLLM_SERVE_FLAGS) == (flag,)
    assert refused(arg) == {}


def test_an_abbreviation_that_a_refused_flag_also_begins_is_refused():
    # --enable-prefix-caching and --enable-prompt-embeds both begin with --enable-pr.
    assert "ambiguous" in refused("--enable-pr")["--enable-pr"]
    # --max-num-partial-prefills is allowed, --max-num-seqs is managed.
    assert "ambiguous" in refused("--max-num")["--max-num"]
    # --seed is a whole flag, --se abbreviates several.
    assert "ambiguous" in refused("--se=1")["--se"]


def test_a_full_name_wins_over_longer_flags_it_begins():
    assert resolve("--model", VLLM_SERVE_FLAGS) == ("--model",)
    assert resolve("--tokenizer", VLLM_SERVE_FLAGS) == ("--tokenizer",)
    assert resolve("--enable-lora", VLLM_SERVE_FLAGS) == ("--enable-lora",)


# --- the platform's extension -----------------------------------------------------------------------


def config(**fields) -> OperatorConfig:
    return OperatorConfig.model_validate({"vllmImage": IMAGE, "loaderImage": LOADER_IMAGE, **fields})


def test_the_platform_can_allow_more_flags():
    extension = tuple(config(tenantVllmFlags=["--enable-lora", "--max-loras", "--a-newer-vllm-flag"]).tenant_vllm_flags)
    assert refused("--enable-lora", "--max-loras", "4", "--a-newer-vllm-flag=1", extra=extension) == {}
    assert refused("--enable-lora", extra=()) != {}
    # Abbreviations resolve against vLLM's flags and the extension together.
    assert refused("--max-loras=2", "--enable-lora", "--a-newer=1", extra=extension) == {}
    assert "ambiguous" in refused("--max-lor=2", extra=extension)["--max-lor"]  # --max-lora-rank too


@pytest.mark.parametrize("flag", ["--trust-remote-code", "--load-format", "--api-key", "--quantization",
                                  "--trust-remote", "--tokenizer", "--otlp"])
def test_the_platform_cannot_allow_a_forbidden_flag_or_a_beginning_of_one(flag):
    with pytest.raises(ValidationError, match="tenants may never set"):
        config(tenantVllmFlags=[flag])
    # And were it listed anyway, it stays refused.
    assert refused(flag, extra=(flag,)) != {}


@pytest.mark.parametrize("flags", [["enable-lora"], ["--Enable-Lora"], ["--enable_lora"], ["--x=1"],
                                   ["--" + "a" * 63], [f"--flag-{i}" for i in range(65)], ["--enable-sleep"]])
def test_the_extension_is_validated(flags):
    with pytest.raises(ValidationError):
        config(tenantVllmFlags=flags)


def test_the_platform_cannot_allow_a_name_vllm_reads_as_another_flag():
    # Not a vLLM 0.11 flag, but vLLM would read it as --enable-sleep-mode.
    with pytest.raises(ValidationError, match="abbreviation of --enable-sleep-mode"):
        config(tenantVllmFlags=["--enable-sleep"])
    assert "abbreviates --enable-sleep-mode" in refused("--enable-sleep", extra=("--enable-sleep",))["--enable-sleep"]


def test_the_chart_values_schema_has_the_extension():
    from slmfleet.api.config import chart_values_schema
    prop = chart_values_schema()["properties"]["tenantVllmFlags"]
    assert prop["items"]["pattern"] == "^--[a-z0-9][a-z0-9-]*$"
    assert prop["maxItems"] == 64


# --- the lists, against vLLM's flags ----------------------------------------------------------------


def test_the_lists_name_real_vllm_flags_and_do_not_overlap():
    assert len(set(VLLM_SERVE_FLAGS)) == len(VLLM_SERVE_FLAGS)
    assert set(TENANT_VLLM_FLAGS) <= set(VLLM_SERVE_FLAGS)
    assert set(FORBIDDEN_VLLM_FLAGS) <= set(VLLM_SERVE_FLAGS)
    assert not set(TENANT_VLLM_FLAGS) & set(FORBIDDEN_VLLM_FLAGS)
    assert set(MANAGED_VLLM_FLAGS) <= set(FORBIDDEN_VLLM_FLAGS)


def test_boolean_allowed_flags_come_with_their_negation():
    for flag in TENANT_VLLM_FLAGS:
        twin = "--" + flag[len("--no-"):] if flag.startswith("--no-") else "--no-" + flag[2:]
        assert (twin in TENANT_VLLM_FLAGS) == (twin in VLLM_SERVE_FLAGS), flag


def test_admission_refuses_no_flag_that_could_be_allowed():
    # The CRD refuses every beginning of a forbidden flag, except the full names of other flags (vLLM
    # reads a full name as itself): else a platform could allow a flag that admission refuses.
    for flag in LONG_FLAGS:
        if flag not in FORBIDDEN_VLLM_FLAGS:
            begun = [f for f in FORBIDDEN_VLLM_FLAGS if f.startswith(flag)]
            assert not begun or flag in ADMITTED_BEGINNINGS, f"{flag} begins the forbidden {begun}"
    assert ADMITTED_BEGINNINGS == ("--reasoning-parser",)  # begins --reasoning-parser-plugin
    assert not set(ADMITTED_BEGINNINGS) & set(FORBIDDEN_VLLM_FLAGS)


def test_the_table_is_the_real_parsers_and_so_is_the_standins():
    # The dump comes from the real vLLM's parser (e2e/real_vllm/serve_flags.py; a test with the real
    # vLLM checks it is current). The operator's table and the stand-in's parser both follow it.
    dumped = json.loads(standin.SERVE_ACTIONS.read_text())
    assert dumped["vllm"] == "0.32.0"
    options = {o for a in dumped["actions"] for o in a["options"]}
    assert set(VLLM_SERVE_FLAGS) == options, (set(VLLM_SERVE_FLAGS) ^ options)
    assert len(VLLM_SERVE_FLAGS) == len(options)
    assert set(standin.build_parser()._option_string_actions) == options


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # type: ignore[override]
        raise _Refused(message)


def _vllm_like_parser() -> argparse.ArgumentParser:
    """An argparse parser with vLLM's option strings (argparse's defaults, as vLLM keeps them)."""
    parser = _Parser(prog="vllm serve", add_help=False)
    parser.add_argument("model_tag", nargs="?")
    for i, flag in enumerate(VLLM_SERVE_FLAGS):
        parser.add_argument(flag, dest=f"f{i}", nargs="?")
    return parser


def test_resolution_matches_argparse_for_every_beginning_of_every_flag():
    parser = _vllm_like_parser()
    dests = {f"f{i}": flag for i, flag in enumerate(VLLM_SERVE_FLAGS)}
    checked = 0
    for flag in LONG_FLAGS:
        for end in range(3, len(flag) + 1):
            name = flag[:end]
            ours = resolve(name, VLLM_SERVE_FLAGS)
            try:
                ns, rest = parser.parse_known_args(["/m", f"{name}=1"])
            except _Refused as exc:
                assert "ambiguous option" in str(exc) and len(ours) > 1, (name, ours, exc)
            else:
                set_ = [dests[d] for d, v in vars(ns).items() if d in dests and v is not None]
                assert (tuple(set_) if set_ else ()) == ours, (name, ours, set_, rest)
            checked += 1
    assert checked > 3000


def test_the_crd_documents_the_rule_and_refuses_the_forbidden_flags():
    serving = crd(SMALLMODEL)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "serving"]
    description = serving["properties"]["extraArgs"]["description"]
    for flag in (*TENANT_VLLM_FLAGS, *FORBIDDEN_VLLM_FLAGS):
        assert flag in description
    assert "tenantVllmFlags" in description and "ExtraArgsRefused" in description
    [rule] = [v["rule"] for v in serving["x-kubernetes-validations"] if "extraArgs" in v["rule"]]
    for flag in FORBIDDEN_VLLM_FLAGS:
        assert f"'{flag}'" in rule
    assert "f.startsWith(" in rule  # a beginning of one, not only the whole name


def test_the_readme_lists_the_allowed_flags():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**`serving.extraArgs`**"):readme.index("- **Sizing**")]
    for flag in TENANT_VLLM_FLAGS:
        if not flag.startswith("--no-"):
            assert f"`{flag}`" in section, flag
