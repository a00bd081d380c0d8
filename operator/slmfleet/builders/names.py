"""Object names. A revision's Deployment and Service share `<model>-<revision>`; the model's
public Service is named after the model, so clients address `<model>.<namespace>.svc`."""

from __future__ import annotations


def revision_object_name(model: str, revision: str) -> str:
    # SmallModel names are at most 52 characters (api.smallmodel.MAX_NAME_LENGTH), so with the
    # 10-character revision this stays a DNS-1035 label of at most 63 characters.
    return f"{model}-{revision}"


def model_service_name(model: str) -> str:
    return model
