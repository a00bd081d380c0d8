"""Hypothesis profiles.

`ci` (the default, what `make test` and CI run): derandomized, so every run tries the same examples
and the suite passes or fails on the code, never on the seed. `explore` (`make unit-explore`):
fresh random examples on every run, to look for what the fixed ones miss; a failure it finds is
pinned with `@example` in the test before it is fixed, so the `ci` profile keeps checking it.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
