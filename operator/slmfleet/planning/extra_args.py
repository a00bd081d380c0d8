"""The vLLM flags a tenant may pass, as a step of a model's plan (the rule: api/vllm_flags.py).

Admission already refused the flags no configuration allows; what is left for the plan is the
allow-list itself, which the platform team extends in OperatorConfig. A model with a refused flag
is blocked like any other: Degraded with reason `ExtraArgsRefused` and no Deployment for its
revision, while a revision that already serves keeps serving.
"""

from __future__ import annotations

from slmfleet.api.config import OperatorConfig
from slmfleet.api.smallmodel import Serving
from slmfleet.api.vllm_flags import refused_extra_args
from slmfleet.planning.common import Failure

# How many refused flags the condition names (each name is bounded too, never with its value).
MAX_NAMED = 5


def extra_args_refused(serving: Serving, config: OperatorConfig) -> Failure | None:
    """The failure naming the flags of `serving.extraArgs` tenants may not pass; None if there are none.
    Permanent: only a change of the spec (or of the platform's allow-list) makes it pass."""
    refused = refused_extra_args(serving.extra_args, config.tenant_vllm_flags)
    if not refused:
        return None
    named = "; ".join(str(r) for r in refused[:MAX_NAMED])
    more = f"; and {len(refused) - MAX_NAMED} more" if len(refused) > MAX_NAMED else ""
    return Failure("ExtraArgsRefused", f"spec.serving.extraArgs refused: {named}{more}", permanent=True)
