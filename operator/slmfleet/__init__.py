"""slmfleet: a Kubernetes operator for fleets of self-hosted small language models on vLLM."""

from importlib import metadata

try:
    __version__ = metadata.version("slmfleet")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
