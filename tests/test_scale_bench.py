"""The pure parts of bench/scale.py: the fleet file, the batch, percentiles, ratios, audit tallies and
the goals table. No cluster, no timing."""

import argparse

import pytest
import yaml

from bench import scale


def test_the_scale_fleet_has_at_least_500_kwok_nodes_in_a_realistic_mix():
    summary = scale.pools_summary(yaml.safe_load(scale.POOLS.read_text()))
    assert summary["nodes"] == summary["kwok_nodes"] >= 500
    products = summary["nodes_by_product"]
    for product in ("NVIDIA-L4", "NVIDIA-A10G", "NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB",
                    "NVIDIA-H100-80GB-HBM3", "cpu-only"):
        assert products.get(product, 0) > 0, product
    assert summary["mig_slices"] > 0 and summary["whole_gpus"] >= 1000


def test_sizes_parse():
    assert scale.parse_sizes("100,1000") == [100, 1000]
    with pytest.raises(argparse.ArgumentTypeError):
        scale.parse_sizes("0")


def test_the_batch_spreads_models_over_tenant_namespaces_and_shapes():
    bodies = scale.model_bodies(250)
    names = [(b["metadata"]["namespace"], b["metadata"]["name"]) for b in bodies]
    assert len(set(names)) == 250
    assert {ns for ns, _ in names} == {"scale-op-0", "scale-op-1", "scale-op-2"}
    assert all(b["spec"]["source"]["uri"].startswith("pvc://weights/") and b["spec"]["architecture"] for b in bodies)
    shares = {shape: sum(shape in n for _, n in names) / 250 for shape, _, _, _ in scale.SHAPES}
    for shape, share, _, _ in scale.SHAPES:
        assert abs(shares[shape] - share) < 0.05


def test_the_batch_passes_the_smallmodel_api():
    from slmfleet.api.smallmodel import SmallModel

    for body in scale.model_bodies(3):
        SmallModel.model_validate(body)


def test_percentiles_and_ratios():
    assert scale.percentile([], 50) is None
    assert scale.percentile([3.0], 99) == 3.0
    assert scale.percentile([1, 2, 3, 4], 50) == 2.5
    assert scale.percentile(range(101), 99) == 99
    assert scale.ratio(10, 4) == 2.5 and scale.ratio(None, 4) is None and scale.ratio(1, 0) is None


def test_audit_entries_tally_by_verb_and_resource_per_model():
    entries = [
        {"verb": "patch", "objectRef": {"resource": "deployments"}},
        {"verb": "patch", "objectRef": {"resource": "smallmodels", "subresource": "status"}},
        {"verb": "create", "objectRef": {"resource": "events"}},
        {"verb": "create", "objectRef": {"resource": "events"}},
        {"verb": "watch", "objectRef": {"resource": "pods"}},
    ]
    assert scale.requests_by_verb(entries, 2) == {
        "create events": 1.0, "patch deployments": 0.5, "patch smallmodels/status": 0.5, "watch pods": 0.5}
    assert [e["verb"] for e in entries if scale.is_write(e)] == ["patch", "patch", "create", "create"]


def test_goals_are_judged_at_the_largest_n():
    small = {"n_models": 100, "ratio_to_floor": 9.0}
    big = {"n_models": 1000, "ratio_to_floor": 1.05, "writes_per_model": 9.2, "noop_resync_writes": 0,
           "rss_mib": 210.0}
    table = {row["figure"]: row for row in scale.goals_table([small, big])}
    assert set(table) == {g[0] for g in scale.GOALS}
    assert table["ratio_to_floor"]["met"] is True and table["ratio_to_floor"]["at_n"] == 1000
    assert table["writes_per_model"]["met"] is False and table["rss_mib"]["met"] is False
    assert table["noop_resync_writes"]["met"] is True
    assert table["restart_healthy_s"]["met"] is None  # not measured
    assert scale.goals_table([]) == []


def test_raw_copies_are_plain_objects_in_the_raw_namespace():
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "m", "namespace": "scale-op-0", "uid": "u", "resourceVersion": "1",
                        "ownerReferences": [{"kind": "SmallModel"}], "labels": {"a": "b"}, "managedFields": []},
           "spec": {"clusterIP": "127.112.0.9", "clusterIPs": ["127.112.0.9"], "ports": [{"port": 8000}]},
           "status": {}}
    copy = scale.raw_copy(svc, "scale-raw-0")
    assert copy == {"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "m", "namespace": "scale-raw-0", "labels": {"a": "b"}, "annotations": {}},
                    "spec": {"ports": [{"port": 8000}]}}
    assert svc["spec"]["clusterIP"] == "127.112.0.9"  # the original is untouched


def test_the_raw_arm_waits_for_the_deployments_the_operator_got_available():
    def dep(replicas, available):
        status = {} if available is None else {"availableReplicas": available}
        return {"kind": "Deployment", "spec": {"replicas": replicas}, "status": status}
    objects = [dep(1, 1), dep(2, 1), dep(1, None), dep(2, 2), {"kind": "Service", "spec": {}, "status": {}}]
    assert scale.available_deployments(objects) == 2


def test_convergence_writes_leave_out_the_change_probes_models_but_not_nameless_writes():
    def write(verb, resource, ns="", name="", sub=None):
        return {"verb": verb, "objectRef": {"resource": resource, "namespace": ns, "name": name,
                                            **({"subresource": sub} if sub else {})}}
    writes = [
        write("patch", "deployments", "t0", "m0001-qwen-0a1b2c3d4e"),
        write("patch", "services", "t0", "m0001-qwen"),
        write("patch", "smallmodels", "t0", "m0001-qwen", "status"),
        write("create", "events", "t0"),  # generateName: no name in the log
        write("patch", "deployments", "t1", "m0002-llama-0a1b2c3d4e"),
        write("patch", "deployments", "t1", "m0002-llama-9f8e7d6c5b"),  # the changed model moved
        write("patch", "smallmodels", "t1", "m0002-llama", "status"),
        write("patch", "smallmodels", "t0", "m0002-llama", "status"),  # another namespace: not it
    ]
    changed = {"t1/m0002-llama"}
    assert [scale.of_models(w, changed) for w in writes] == [False] * 4 + [True] * 3 + [False]
    # 5 writes that are not the changed model's, over the 2 models left alone.
    assert scale.convergence_writes(writes, 3, changed) == 2.5
    assert scale.convergence_writes(writes, 3, set()) == round(8 / 3, 3)
