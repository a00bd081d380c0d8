"""Where a revision's pods find the weights.

Today the weights come from a PersistentVolumeClaim mounted read-only. S3 sources need the
verifying weight loader (an init container that downloads and checks every file against the
pinned manifest); until that exists they are refused here rather than served unverified.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELS_MOUNT_PATH = "/models"
WEIGHTS_VOLUME = "weights"


class UnsupportedSource(ValueError):
    """The weights source cannot be served (yet); the message says why, for a status condition."""


@dataclass(frozen=True)
class PvcWeights:
    """`pvc://<claim>/<path>`: a claim and a directory inside its volume."""

    claim: str
    path: str  # relative to the volume root, without leading or trailing slashes; may be empty

    @property
    def model_path(self) -> str:
        """The model directory as the container sees it."""
        return f"{MODELS_MOUNT_PATH}/{self.path}" if self.path else MODELS_MOUNT_PATH

    def volume(self) -> dict:
        # The weights are read by every replica and never written: readOnly on the claim as well
        # as on the mount, so a read-write claim cannot be modified through these pods.
        return {"name": WEIGHTS_VOLUME, "persistentVolumeClaim": {"claimName": self.claim, "readOnly": True}}

    def volume_mount(self) -> dict:
        return {"name": WEIGHTS_VOLUME, "mountPath": MODELS_MOUNT_PATH, "readOnly": True}


def weights_location(uri: str) -> PvcWeights:
    """The weights of a source URI, or UnsupportedSource."""
    if uri.startswith("s3://"):
        raise UnsupportedSource(
            f"weights source {uri!r}: S3 sources need the verifying weight loader, which is not "
            "available yet; serve the weights from a PersistentVolumeClaim (pvc://claim/path) for now"
        )
    if not uri.startswith("pvc://"):
        raise UnsupportedSource(f"weights source {uri!r}: expected pvc://claim/path or s3://bucket/prefix/")
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    if not claim:
        raise UnsupportedSource(f"weights source {uri!r}: no claim name after pvc://")
    segments = [s for s in path.split("/") if s]
    # A path that climbs out of the volume root would point at the container's own file system.
    if any(s in (".", "..") for s in segments):
        raise UnsupportedSource(f"weights source {uri!r}: the path must not contain '.' or '..' segments")
    return PvcWeights(claim=claim, path="/".join(segments))
