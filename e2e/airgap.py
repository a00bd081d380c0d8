"""`make airgap`: slmfleet installed as in an air-gapped cluster, end to end, on a small local cluster.

The cluster's loopback registry is the mirror: the images `make images` built are pushed to it by
digest (crane keeps digests), the chart `make chart` packaged is pushed with `helm push`, and
`helm install` from oci:// puts the operator in-cluster on the chart's ServiceAccount and RBAC. Then:
a model is served, `helm test` passes, `helm upgrade` brings a changed CRD and a new operator
image without touching the model, a missing image shows where it should, and `helm uninstall`
keeps the CRDs and the models. Each step prints what it did.

    python -m e2e.airgap [--state-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from e2e import chart_install as ci
from e2e.cluster import REPO, Cluster, binaries, built_images, urlopen
from e2e.operator_proc import audit_writes, reconciles
from e2e.wait import wait_for

PORT_BASE = 27443
MODELS = "airgap-models"
MODEL = "qwen2-5-0-5b"
MISSING_DIGEST = "sha256:" + "0" * 64
# A CRD field the upgraded chart adds, to prove `helm upgrade` updates CRDs (Helm never upgrades
# a chart's crds/ directory; this chart renders them as templates).
UPGRADE_FIELD = "upgradeCheck"
POOLS = textwrap.dedent("""
    # The air-gapped install's cluster: two process nodes (the operator and the served model run
    # for real) and one simulated L4.
    podCIDRFirstOctet: 230
    pools:
      - name: proc
        nodes: 2
        agent: process
        cpu: 8
        memory: 32Gi
        gpu: {product: NVIDIA-L4, memoryMiB: 23034, count: 1, family: ada-lovelace, computeMajor: 8, computeMinor: 9}
      - name: l4
        nodes: 1
        gpu: {product: NVIDIA-L4, memoryMiB: 23034, count: 1, family: ada-lovelace, computeMajor: 8, computeMinor: 9}
""")


def step(msg: str) -> None:
    print(f"\n==> [airgap] {msg}", flush=True)


def say(msg: str) -> None:
    print(f"    {msg}", flush=True)


@dataclass
class Record:
    """What the flow saw, for the e2e test to check."""

    pushed: dict[str, str] = field(default_factory=dict)
    no_digest_error: str = ""
    missing_operator_image: dict = field(default_factory=dict)
    operator: ci.OperatorPod | None = None
    operator_audit_users: set[str] = field(default_factory=set)
    answer: str = ""
    helm_test: str = ""
    upgraded_operator: ci.OperatorPod | None = None
    crd_has_upgrade_field: bool = False
    writes_to_models_during_upgrade: list[str] = field(default_factory=list)
    pods_before_upgrade: set[str] = field(default_factory=set)
    pods_after_upgrade: set[str] = field(default_factory=set)
    missing_vllm_image: dict = field(default_factory=dict)
    answer_while_degraded: str = ""
    after_uninstall: dict[str, bool] = field(default_factory=dict)


def kget(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster._kubectl("get", *args, "-o", "json").stdout)


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def model_objects() -> list[dict]:
    """The example 0.5B model in the air-gapped models namespace, on its weights claim."""
    model = yaml.safe_load((REPO / "examples" / "smallmodels" / "10-qwen2.5-0.5b.yaml").read_text())
    model["metadata"]["namespace"] = MODELS
    model["spec"]["source"]["uri"] = model["spec"]["source"]["uri"].replace("pvc://demo-weights/", "pvc://weights/")
    pv_name = f"{MODELS}-weights"
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(REPO / "examples" / "weights")},
                  "claimRef": {"namespace": MODELS, "name": "weights"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": MODELS},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                  "resources": {"requests": {"storage": "1Gi"}}}},
        model,
    ]


def model_pods(cluster: Cluster) -> list[dict]:
    return [p for p in kget(cluster, "pods", "-n", MODELS, "-l", f"slmfleet.io/model={MODEL}")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def chat(ip: str, question: str) -> str:
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions",
        data=json.dumps({"model": "qwen2.5-0.5b-instruct", "messages": [{"role": "user", "content": question}]}).encode(),
        headers={"Content-Type": "application/json"})
    with urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def upgraded_chart(package: Path, work: Path, version: str) -> Path:
    """The packaged chart as its next release would be: a new version and a new CRD field."""
    src = work / "upgrade-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(package) as tar:
        tar.extractall(src, filter="data")
    chart = src / ci.CHART_NAME
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = meta["appVersion"] = version
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    crd_file = next(f for f in (chart / "files" / "crds").glob("*.yaml") if "smallmodels" in f.name)
    crd = yaml.safe_load(crd_file.read_text())
    spec_props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec_props[UPGRADE_FIELD] = {"type": "string", "maxLength": 63,
                                 "description": "Added by the air-gapped upgrade test: proves helm upgrade updates CRDs."}
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    out = work / "charts-upgrade"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(binaries()["helm"]), "package", str(chart), "--destination", str(out)], check=True,
                   capture_output=True, text=True)
    return out / f"{ci.CHART_NAME}-{version}.tgz"


def run(cluster: Cluster, work: Path) -> Record:
    rec = Record()
    helm = ci.Helm(cluster)
    images = built_images()
    if not images:
        raise RuntimeError("no built images (build/images.json): run `make images` first")

    step(f"The mirror: the cluster's loopback registry {cluster.registry}; the built images pushed by digest")
    # One snapshot of build/images.json for the whole flow (a rebuild meanwhile must not mix digests).
    work.mkdir(parents=True, exist_ok=True)
    snapshot = work / "images.json"
    snapshot.write_text(json.dumps({"images": images}))
    cluster.push_images(images)
    for name, image in sorted(images.items()):
        rec.pushed[name] = cluster.image_ref(name, images)
        say(f"{rec.pushed[name]}  ({image.get('compressedBytes', 0) / 2**20:.1f} MiB compressed)")
    package = ci.package_chart(work / "charts", snapshot)
    chart_ref = ci.push_chart(cluster, package)
    version = ci.chart_version()

    step("Values without a digest are refused by the chart's schema")
    bad = ci.values_file(cluster, work / "values-no-digest.yaml", images=images)
    values = yaml.safe_load(bad.read_text())
    values["image"]["digest"] = ""
    bad.write_text(yaml.safe_dump(values))
    out = helm.run("install", ci.RELEASE, chart_ref, "--version", version, "--plain-http", "-n", ci.NAMESPACE,
                   "-f", str(bad), check=False)
    rec.no_digest_error = out.stderr.strip()
    say(f"helm install exited {out.returncode}: {rec.no_digest_error.splitlines()[-1] if rec.no_digest_error else ''}")
    if out.returncode == 0:
        raise RuntimeError("helm install accepted values without a digest")

    step(f"helm install {chart_ref} --version {version}, the operator image's digest missing from the mirror")
    ci.prepare_namespace(cluster, ci.NAMESPACE)
    missing = ci.values_file(cluster, work / "values-missing-image.yaml", operator_digest=MISSING_DIGEST, images=images)
    helm.run("install", ci.RELEASE, chart_ref, "--version", version, "--plain-http", "-n", ci.NAMESPACE,
             "-f", str(missing))

    def pull_backoff() -> dict | None:
        for pod in ci.operator_pods(cluster):
            for c in pod.get("status", {}).get("containerStatuses") or []:
                waiting = (c.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") == "ImagePullBackOff":
                    return {"pod": pod["metadata"]["name"], "image": c["image"], **waiting}
        return None

    rec.missing_operator_image = wait_for(pull_backoff, 60, what="the operator pod's ImagePullBackOff")
    say(f"{rec.missing_operator_image['pod']}: ImagePullBackOff for {rec.missing_operator_image['image']}")

    step("helm upgrade with the digest the mirror has: the operator runs in-cluster")
    good = ci.values_file(cluster, work / "values.yaml", images=images)
    helm.run("upgrade", ci.RELEASE, chart_ref, "--version", version, "--plain-http", "-n", ci.NAMESPACE, "-f", str(good))
    rec.operator = ci.wait_operator(cluster, timeout=120)
    pod = kget(cluster, "pod", "-n", ci.NAMESPACE, rec.operator.name)
    say(f"{rec.operator.name} Ready on {pod['spec']['nodeName']} at {rec.operator.ip}, "
        f"ServiceAccount {pod['spec']['serviceAccountName']}, image {rec.operator.image_id}")

    step(f"A SmallModel in namespace {MODELS} (Pod Security restricted), its pods pulled from the mirror")
    ci.prepare_namespace(cluster, MODELS)
    objects = model_objects()
    ci.apply(cluster, *objects[:2])
    cluster._kubectl("wait", "-n", MODELS, "--for=jsonpath={.status.phase}=Bound", "pvc/weights", "--timeout=60s")
    ci.apply(cluster, objects[2])
    model = wait_for(lambda: (m := kget(cluster, "sm", "-n", MODELS, MODEL))
                     and condition(m, "Ready").get("status") == "True" and m, 180, 0.5, "the model Ready")
    pods = model_pods(cluster)
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("podIP"))
    rec.answer = chat(ip, "What is the capital of France?")
    say(f"{MODEL} Ready ({condition(model, 'Ready')['message']}); asked at {ip}: {rec.answer!r}")
    # Who wrote the model's objects (Deployments, Services, its status): only the chart's ServiceAccount.
    _, writes = audit_writes(cluster, user=None)
    # (The controllers' own writes, such as deployments/status, are theirs to make.)
    owned = {("deployments", ""), ("services", ""), ("smallmodels", "status")}
    ours = [w for w in writes if w.get("objectRef", {}).get("namespace") == MODELS
            and (w["objectRef"].get("resource"), w["objectRef"].get("subresource", "")) in owned]
    rec.operator_audit_users = {w["user"]["username"] for w in ours}
    say(f"the model's objects were written {len(ours)} times, by {', '.join(sorted(rec.operator_audit_users)) or '(nobody)'}")

    step("helm test")
    out = helm.run("test", ci.RELEASE, "-n", ci.NAMESPACE, check=False, timeout=180)
    rec.helm_test = out.stdout
    if out.returncode != 0:
        raise RuntimeError(f"helm test failed: {out.stderr.strip()}\ntest pod's output:\n"
                           + ci.container_log(cluster, ci.NAMESPACE, f"{ci.RELEASE}-test-healthz"))
    say(next((line.strip() for line in out.stdout.splitlines() if line.strip().startswith("Phase:")), out.stdout.strip()))

    step("helm upgrade to the next release: a changed CRD field and a new operator image digest")
    rec.pods_before_upgrade = {p["metadata"]["uid"] for p in model_pods(cluster)}
    base = f"{cluster.registry}/{images['slmfleet']['repository']}"
    next_version = version + "-upgrade"
    new_ref = subprocess.run([str(binaries()["crane"]), "mutate", cluster.image_ref("slmfleet", images),
                              "--label", "io.slmfleet.test/rebuild=upgrade", "-t", f"{base}:{next_version}"],
                             check=True, capture_output=True, text=True).stdout.strip()
    new_digest = new_ref.split("@", 1)[1]
    say(f"pushed {base}:{next_version}@{new_digest}")
    upgrade_package = upgraded_chart(package, work, next_version)
    ci.push_chart(cluster, upgrade_package)
    upgrade_values = ci.values_file(cluster, work / "values-upgrade.yaml", operator_digest=new_digest, images=images)
    doc = yaml.safe_load(upgrade_values.read_text())
    doc["image"]["tag"] = next_version
    upgrade_values.write_text(yaml.safe_dump(doc, sort_keys=False))
    mark, _ = audit_writes(cluster)
    helm.run("upgrade", ci.RELEASE, chart_ref, "--version", next_version, "--plain-http", "-n", ci.NAMESPACE,
             "-f", str(upgrade_values))
    new_image = f"{base}:{next_version}@{new_digest}"
    rec.upgraded_operator = ci.wait_operator(cluster, timeout=120, image=new_image)
    crd = kget(cluster, "crd", "smallmodels.slmfleet.io")
    spec_props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rec.crd_has_upgrade_field = UPGRADE_FIELD in spec_props
    # The new operator resyncs every model on start: once it has reconciled the model, any write
    # it was going to make is in the audit log.
    url = rec.upgraded_operator.url
    wait_for(lambda: ci.healthz(url) == 200 and reconciles(url) >= 1, 60, 0.5, "the new operator's resync")
    _, writes = audit_writes(cluster, user=f"system:serviceaccount:{ci.NAMESPACE}:{ci.RELEASE}-operator", since_line=mark)
    rec.writes_to_models_during_upgrade = [
        f"{w['verb']} {w['objectRef'].get('resource')}/{w['objectRef'].get('subresource', '')} {w['objectRef'].get('name')}"
        for w in writes if w.get("objectRef", {}).get("namespace") == MODELS]
    rec.pods_after_upgrade = {p["metadata"]["uid"] for p in model_pods(cluster)}
    say(f"operator now {rec.upgraded_operator.name} on {rec.upgraded_operator.image_id}; CRD field "
        f"spec.{UPGRADE_FIELD} {'present' if rec.crd_has_upgrade_field else 'MISSING'}; writes to {MODELS}: "
        f"{rec.writes_to_models_during_upgrade or 'none'}; model pods unchanged: "
        f"{rec.pods_before_upgrade == rec.pods_after_upgrade}")

    step("A vLLM image the mirror lacks: the SmallModel says which image, and the running revision keeps serving")
    missing_vllm = ci.values_file(cluster, work / "values-missing-vllm.yaml", operator_digest=new_digest,
                                  vllm_digest=MISSING_DIGEST, images=images)
    doc = yaml.safe_load(missing_vllm.read_text())
    doc["image"]["tag"] = next_version
    missing_vllm.write_text(yaml.safe_dump(doc, sort_keys=False))
    helm.run("upgrade", ci.RELEASE, chart_ref, "--version", next_version, "--plain-http", "-n", ci.NAMESPACE,
             "-f", str(missing_vllm))
    degraded = wait_for(lambda: (c := condition(kget(cluster, "sm", "-n", MODELS, MODEL), "Degraded"))
                        and c.get("reason") == "ImagePullFailed" and c, 180, 0.5, "Degraded ImagePullFailed")
    rec.missing_vllm_image = degraded
    rec.answer_while_degraded = chat(ip, "What is the capital of France?")  # the running pod, untouched
    say(f"Degraded={degraded['status']} {degraded['reason']}: {degraded['message']}")

    step("helm uninstall keeps the CRDs and the SmallModels")
    helm.run("uninstall", ci.RELEASE, "-n", ci.NAMESPACE, "--wait", timeout=180)
    crds = cluster._kubectl("get", "crd", "smallmodels.slmfleet.io", "modelrollouts.slmfleet.io", check=False)
    sm = cluster._kubectl("get", "sm", "-n", MODELS, MODEL, check=False)
    rec.after_uninstall = {"crds": crds.returncode == 0, "smallmodel": sm.returncode == 0,
                           "operator pods": bool(ci.operator_pods(cluster))}
    say(f"after uninstall: {rec.after_uninstall}")
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.airgap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=REPO / ".e2e-airgap")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = parser.parse_args(argv)
    cluster = Cluster(args.state_dir, PORT_BASE)
    pools = args.state_dir.parent / f"{args.state_dir.name}-pools.yaml"
    pools.write_text(POOLS)
    step(f"A small local cluster in {args.state_dir} (ports from {PORT_BASE})")
    cluster.up(pools, reuse=False)
    try:
        run(cluster, args.state_dir / "work")
    finally:
        if not args.keep:
            cluster.down()
            pools.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
