"""Pydantic models of the SmallModel and ModelRollout resources; the CRD YAML in crds/ is generated from them."""
