"""The custom resources as frozen pydantic models; the CRDs in crds/ are generated from them."""
