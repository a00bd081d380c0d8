"""Pure: the desired Deployment, Service, HTTPRoute and labels for a model revision."""

from slmfleet.builders.deployment import build_deployment, rolling_update_strategy
from slmfleet.builders.labels import model_labels, model_selector, revision_labels, selector_labels
from slmfleet.builders.names import model_service_name, revision_object_name
from slmfleet.builders.owner import ModelOwner
from slmfleet.builders.pod import build_pod_template, served_model_name
from slmfleet.builders.revision import revision_of
from slmfleet.builders.service import build_model_service, build_revision_service, model_endpoint
from slmfleet.builders.vllm_args import vllm_serve_args
from slmfleet.builders.weights import PvcSource, S3Source, UnsupportedSource, parse_source

__all__ = [
    "ModelOwner",
    "PvcSource",
    "S3Source",
    "UnsupportedSource",
    "build_deployment",
    "build_model_service",
    "build_pod_template",
    "build_revision_service",
    "model_endpoint",
    "model_labels",
    "model_selector",
    "model_service_name",
    "revision_labels",
    "revision_object_name",
    "revision_of",
    "rolling_update_strategy",
    "selector_labels",
    "served_model_name",
    "vllm_serve_args",
    "parse_source",
]
