"""The air-gapped install end to end (`make airgap`'s flow), on a small cluster of its own beside the
session's: chart and images from the loopback registry, the operator in-cluster on the chart's
ServiceAccount, helm test, an upgrade that changes a CRD and the operator image without touching
the model, missing images reported where they should be, and an uninstall that keeps the CRDs
and the models."""

from __future__ import annotations

import pytest

from e2e import airgap
from e2e import chart_install as ci
from e2e.cluster import Cluster, built_images


@pytest.fixture
def small_cluster(tmp_path, cluster):  # `cluster`: the session's images are built and its ports known
    pools = tmp_path / "pools.yaml"
    pools.write_text(airgap.POOLS)
    small = Cluster(tmp_path / "cluster", airgap.PORT_BASE)
    try:
        small.up(pools, reuse=False)
        yield small
    finally:
        small.down()


def test_air_gapped_install_upgrade_and_uninstall(small_cluster, tmp_path):
    rec = airgap.run(small_cluster, tmp_path / "work")
    images = built_images()
    registry = small_cluster.registry

    # Pushed by digest: the references the cluster pulls are the built digests.
    assert rec.pushed == {name: f"{registry}/{i['repository']}:{i['tag']}@{i['digest']}" for name, i in images.items()}
    # Values without a digest: the schema's message, and nothing installed.
    assert "digest" in rec.no_digest_error and "sha256" in rec.no_digest_error
    # A digest the mirror lacks: the operator pod backs off pulling exactly that image.
    assert rec.missing_operator_image["image"].endswith("@" + airgap.MISSING_DIGEST)
    assert "not found" in rec.missing_operator_image["message"]

    # In-cluster, on the chart's ServiceAccount (its writes are audited as that account, and only it).
    assert rec.operator is not None
    assert rec.operator.image_id == f"{registry}/{images['slmfleet']['repository']}@{images['slmfleet']['digest']}"
    assert rec.operator_audit_users == {f"system:serviceaccount:{ci.NAMESPACE}:{ci.RELEASE}-operator"}
    assert rec.answer == "Paris"
    assert "Phase:" in rec.helm_test and "Succeeded" in rec.helm_test

    # The upgrade: new CRD field, new operator image, the model untouched.
    assert rec.upgraded_operator is not None and rec.upgraded_operator.name != rec.operator.name
    assert rec.upgraded_operator.image_id != rec.operator.image_id
    assert rec.crd_has_upgrade_field
    assert rec.writes_to_models_during_upgrade == []
    assert rec.pods_before_upgrade and rec.pods_before_upgrade == rec.pods_after_upgrade

    # A vLLM image missing from the mirror: Degraded, naming the image.
    assert rec.missing_vllm_image["status"] == "True"
    assert f"@{airgap.MISSING_DIGEST}" in rec.missing_vllm_image["message"]
    assert rec.answer_while_degraded == "Paris", "the running revision keeps serving"

    assert rec.after_uninstall == {"crds": True, "smallmodel": True, "operator pods": False}
