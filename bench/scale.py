"""Scale benchmark (issue 15): N SmallModels on PVC sources, created in one batch, on a 520-node kwok
fleet (bench/scale-pools.yaml), against the operator as it is in the tree. Writes
bench/results/scale.json. `python -m bench.scale [--sizes 100,1000] [--port-base 24443]
[--keep-cluster] [--profile]`.

Per N, on its own cluster (own state dir and ports, beside the default one), with the operator a
local process as its RBAC user (e2e.operator_proc.OperatorProcess, metrics port 18691):
1. the operator arm: N SmallModels created at once (N/100 tenant namespaces, each with a bound
   `weights` claim; `architecture` declared, so nothing reads weights). While the batch converges,
   a spec change (serving.replicas 1 -> 2) every few seconds to a model whose Deployment exists;
   change -> its Deployment has the new replicas is the change latency. Recorded: time until every
   model is Ready (at its latest generation), time until the last of the N Deployments exists,
   the operator's requests by verb and resource (the API server's audit log, which this cluster
   also keeps for the operator's reads), its peak RSS (VmHWM) and CPU seconds;
2. a restart after convergence: seconds to /healthz 200 and until reconciles stop (5 s quiet), and
   the writes it made meanwhile (a no-op resync: should be 0);
3. a second restart with a spec change made as the new process starts: change -> Deployment;
4. the raw floor: the operator stopped and its namespaces deleted, the very Deployments and Services
   it made (copied: metadata trimmed to name, labels, annotations; no owner; Services without their
   ClusterIPs) are applied into fresh namespaces with the operator's own client
   (slmfleet.k8s.KubeClient, server-side apply, its 16 API threads), and timed until every
   Deployment is available. The kube-controller-manager keeps its default client QPS (20) for both.

Timings come from watches in this process (first time an object is seen in a state), not from the
objects' timestamps. The machine is shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
POOLS = REPO / "bench" / "scale-pools.yaml"
GROUP, VERSION, PLURAL = "slmfleet.io", "v1alpha1", "smallmodels"
MODEL_LABEL = "slmfleet.io/model"
METRICS_PORT = 18691
KCM_CLIENT_QPS = 20  # kube-controller-manager's --kube-api-qps default; the cluster does not set it
OP_PREFIX, RAW_PREFIX = "scale-op", "scale-raw"
MODELS_PER_NAMESPACE = 100
DIGEST = "sha256:" + "5c" * 32

# Model shapes in the batch, by share: mostly small models (they fit MIG slices and L4/A10G), some 4B and 8B.
SHAPES: list[tuple[str, float, dict[str, Any], dict[str, Any]]] = [
    ("qwen2-5-0-5b", 0.6, {"modelType": "qwen2", "numHiddenLayers": 24, "hiddenSize": 896, "numAttentionHeads": 14,
                           "numKeyValueHeads": 2, "vocabSize": 151936, "intermediateSize": 4864,
                           "tieWordEmbeddings": True, "maxPositionEmbeddings": 32768},
     {"maxModelLen": 8192, "concurrency": 8}),
    ("qwen3-4b", 0.3, {"modelType": "qwen3", "numHiddenLayers": 36, "hiddenSize": 2560, "numAttentionHeads": 32,
                       "numKeyValueHeads": 8, "headDim": 128, "vocabSize": 151936, "intermediateSize": 9728,
                       "tieWordEmbeddings": True, "maxPositionEmbeddings": 40960},
     {"concurrency": 4}),
    ("llama-3-1-8b", 0.1, {"modelType": "llama", "numHiddenLayers": 32, "hiddenSize": 4096, "numAttentionHeads": 32,
                           "numKeyValueHeads": 8, "vocabSize": 128256, "intermediateSize": 14336,
                           "tieWordEmbeddings": False, "maxPositionEmbeddings": 131072},
     {"maxModelLen": 8192, "concurrency": 4}),
]

# The issue's goals at N = 1000: (field, comparison, bound).
GOALS: list[tuple[str, str, float]] = [
    ("ratio_to_floor", "<=", 1.1),
    ("apply_ratio_to_raw", "<=", 1.5),
    ("writes_per_model", "<=", 5),
    ("restart_healthy_s", "<=", 15),
    ("restart_change_s", "<=", 20),
    ("change_latency_p99_s", "<=", 2),
    ("rss_mib", "<=", 200),
    ("noop_resync_writes", "==", 0),
]

READ_VERBS = ("get", "list", "watch")


def log(msg: str) -> None:
    print(f"==> [scale] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ pure parts (tests/test_scale_bench.py)

def parse_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers separated by commas, not {text!r}")
    return sizes


def pools_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Nodes of a pools document by agent and by GPU product (whole GPUs and MIG slices counted)."""
    from slmfleet.sizing.pools import expand, parse_pools_doc

    nodes = expand(*parse_pools_doc(doc))
    by_product: Counter[str] = Counter()
    gpus = mig = 0
    for node in nodes:
        product = node.labels.get("nvidia.com/gpu.product", "cpu-only")
        by_product[product] += 1
        gpus += int(node.allocatable.get("nvidia.com/gpu", 0))
        mig += sum(int(v) for k, v in node.allocatable.items() if k.startswith("nvidia.com/mig-"))
    return {"nodes": len(nodes), "kwok_nodes": sum(n.agent == "kwok" for n in nodes),
            "nodes_by_product": dict(sorted(by_product.items())), "whole_gpus": gpus, "mig_slices": mig}


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None without values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def namespaces(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(max(1, math.ceil(n / MODELS_PER_NAMESPACE)))]


def model_bodies(n: int, prefix: str = OP_PREFIX) -> list[dict[str, Any]]:
    """N SmallModels on pvc://weights/model across the tenant namespaces, in the SHAPES mix."""
    nss = namespaces(prefix, n)
    bodies = []
    bounds = [0.0]
    for _, share, _, _ in SHAPES:
        bounds.append(bounds[-1] + share)
    for i in range(n):
        frac = (i * 0.618034) % 1  # spread the shapes evenly through the batch
        k = next(j for j in range(len(SHAPES)) if frac < bounds[j + 1] or j == len(SHAPES) - 1)
        name, _, arch, serving = SHAPES[k]
        bodies.append({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "SmallModel",
            "metadata": {"name": f"m{i:04d}-{name}", "namespace": nss[i % len(nss)]},
            "spec": {"source": {"uri": "pvc://weights/model", "digest": DIGEST}, "architecture": arch,
                     "serving": dict(serving), "resources": {"nodeSelector": {"slmfleet.io/node-agent": "kwok"}}},
        })
    return bodies


def requests_by_verb(entries: Iterable[dict[str, Any]], n_models: int) -> dict[str, float]:
    """'<verb> <resource>[/<subresource>]' -> requests per model, from audit entries."""
    counts: Counter[str] = Counter()
    for e in entries:
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[f"{e.get('verb')} {resource}"] += 1
    return {k: round(v / n_models, 3) for k, v in sorted(counts.items())}


def is_write(entry: dict[str, Any]) -> bool:
    return entry.get("verb") not in READ_VERBS


def of_models(entry: dict[str, Any], models: set[str]) -> bool:
    """Whether an audit entry names an object of one of `models` ("namespace/name"): the model, its
    Service, its Deployments ("<name>-<revision>") and its named Events. The benchmark's names
    ("m0042-...") are unique up to the first dash, so a prefix never names another model."""
    ref = entry.get("objectRef") or {}
    name, ns = ref.get("name") or "", ref.get("namespace") or ""
    return any(f"{ns}/{name}" == m or f"{ns}/{name}".startswith(m + "-") for m in models)


def convergence_writes(writes: list[dict[str, Any]], n: int, changed: set[str]) -> float:
    """Writes per model to converge: those of the models the change probe left alone, plus every
    write that names no model (an Event created by generateName is logged without its name, so the
    changed models' Events count here too), over the models left alone. The probe's own spec
    changes (replicas 1 -> 2, and what they cost) are not convergence; they are reported apart."""
    mine = sum(1 for w in writes if not of_models(w, changed))
    return round(mine / max(1, n - len(changed)), 3)


def goals_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal against the run at the largest N measured (the goals are set at N = 1000)."""
    if not results:
        return []
    run = max(results, key=lambda r: r["n_models"])
    table = []
    for field, op, bound in GOALS:
        value = run.get(field)
        met = None if value is None else (value <= bound if op == "<=" else value == bound)
        table.append({"figure": field, "goal": f"{op} {bound:g}", "at_n": run["n_models"], "value": value, "met": met})
    return table


def available_deployments(objects: Iterable[dict[str, Any]]) -> int:
    """How many of the objects are Deployments with every replica available."""
    return sum(1 for o in objects if o.get("kind") == "Deployment"
               and ((o.get("status") or {}).get("availableReplicas") or 0) >= ((o.get("spec") or {}).get("replicas") or 0))


def raw_copy(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    """An operator-made Deployment or Service as a plain client would create it in `namespace`."""
    meta = obj["metadata"]
    spec = json.loads(json.dumps(obj["spec"]))
    if obj["kind"] == "Service":
        for key in ("clusterIP", "clusterIPs"):
            spec.pop(key, None)
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "metadata": {"name": meta["name"], "namespace": namespace, "labels": dict(meta.get("labels") or {}),
                         "annotations": dict(meta.get("annotations") or {})},
            "spec": spec}


# ------------------------------------------------------------------ the cluster

def scale_cluster_class():
    from e2e.cluster import Cluster

    class ScaleCluster(Cluster):
        """The local cluster, whose audit log also keeps the operator's reads (by verb)."""

        def _prepare(self, network):  # type: ignore[no-untyped-def]
            files = super()._prepare(network)
            policy = yaml.safe_load(files["audit_policy"].read_text())
            policy["rules"].insert(0, {"level": "Metadata", "users": ["slmfleet-operator"], "verbs": list(READ_VERBS)})
            files["audit_policy"].write_text(yaml.safe_dump(policy))
            return files

    return ScaleCluster


class Audit:
    """The audit log read on from a byte offset (the log is large; each read takes only what is new)."""

    def __init__(self, path: Path):
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def entries(self, since: int, user: str = "slmfleet-operator") -> list[dict[str, Any]]:
        out = []
        with open(self.path, "rb") as f:
            f.seek(since)
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("stage") == "ResponseComplete" and e.get("user", {}).get("username") == user:
                    out.append(e)
        return out


class Watcher:
    """Deployments and SmallModels of the bench's namespaces, seen through watches: when each was
    first seen, its replicas, when it became available / Ready."""

    def __init__(self, kubeconfig: Path):
        from kubernetes import client, config

        self.api = config.new_client_from_config(str(kubeconfig))
        self.apps = client.AppsV1Api(self.api)
        self.crs = client.CustomObjectsApi(self.api)
        self.lock = threading.Lock()
        self.dep_first: dict[str, float] = {}  # ns/model -> first Deployment seen
        self.dep_available: dict[str, float] = {}  # ns/deployment name -> available at spec.replicas
        self.dep_replicas: dict[str, tuple[int, float]] = {}  # ns/model -> (spec.replicas, since)
        self.ready: dict[str, float] = {}  # ns/model -> Ready at its generation
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True) for kind in ("dep", "sm")]
        for t in self.threads:
            t.start()

    def _loop(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self.stop.is_set():
            try:
                if kind == "dep":
                    lst = self.apps.list_deployment_for_all_namespaces(label_selector=MODEL_LABEL)
                    items, rv = [self.api.sanitize_for_serialization(d) for d in lst.items], lst.metadata.resource_version
                    fn, kw = self.apps.list_deployment_for_all_namespaces, {"label_selector": MODEL_LABEL}
                else:
                    lst = self.crs.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                    items, rv = lst["items"], lst["metadata"]["resourceVersion"]
                    fn, kw = self.crs.list_cluster_custom_object, {"group": GROUP, "version": VERSION, "plural": PLURAL}
                for obj in items:
                    self._see(kind, obj)
                w = watch.Watch()
                for ev in w.stream(fn, resource_version=rv, timeout_seconds=120, **kw):
                    if self.stop.is_set():
                        w.stop()
                        return
                    obj = ev["object"]
                    if not isinstance(obj, dict):
                        obj = self.api.sanitize_for_serialization(obj)
                    if ev["type"] != "DELETED":
                        self._see(kind, obj)
            except ApiException as exc:
                if exc.status != 410:
                    time.sleep(1)
            except Exception:  # noqa: BLE001 - a dropped watch: list and watch again
                time.sleep(1)

    def _see(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        meta = obj["metadata"]
        ns = meta["namespace"]
        with self.lock:
            if kind == "dep":
                model = (meta.get("labels") or {}).get(MODEL_LABEL, meta["name"])
                key = f"{ns}/{model}"
                self.dep_first.setdefault(key, now)
                replicas = int((obj.get("spec") or {}).get("replicas") or 0)
                if self.dep_replicas.get(key, (None, 0))[0] != replicas:
                    self.dep_replicas[key] = (replicas, now)
                st = obj.get("status") or {}
                name = f"{ns}/{meta['name']}"
                if (int(st.get("availableReplicas") or 0) >= replicas > 0
                        and int(st.get("updatedReplicas") or 0) >= replicas
                        and st.get("observedGeneration") == meta.get("generation")):
                    self.dep_available.setdefault(name, now)
                else:
                    self.dep_available.pop(name, None)
            else:
                key = f"{ns}/{meta['name']}"
                conds = (obj.get("status") or {}).get("conditions") or []
                ok = any(c.get("type") == "Ready" and c.get("status") == "True"
                         and c.get("observedGeneration") == meta.get("generation") for c in conds)
                if ok:
                    self.ready.setdefault(key, now)
                else:
                    self.ready.pop(key, None)

    def count(self, what: dict[str, float], prefix: str) -> int:
        with self.lock:
            return sum(1 for k in what if k.startswith(prefix))

    def last(self, what: dict[str, float], prefix: str) -> float | None:
        with self.lock:
            xs = [v for k, v in what.items() if k.startswith(prefix)]
        return max(xs) if xs else None

    def close(self) -> None:
        self.stop.set()


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.5,
               progress: Callable[[], str] | None = None) -> float:
    t0 = time.monotonic()
    last_print = t0
    while not check():
        now = time.monotonic()
        if now - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" ({progress()})" if progress else ""))
        if progress and now - last_print >= 15:
            log(f"  ... {what}: {progress()} ({now - t0:.0f}s)")
            last_print = now
        time.sleep(every)
    return time.monotonic() - t0


def proc_stats(pid: int) -> tuple[float, float]:
    """(VmHWM in MiB, user+system CPU seconds) of a live process."""
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm, cpu


def kcm_qps_flag(cluster) -> str | None:  # type: ignore[no-untyped-def]
    try:
        pid = int((cluster.pids / "kube-controller-manager.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
        return None
    return next((a for a in argv if a.startswith("--kube-api-qps")), "")


# ------------------------------------------------------------------ one N

class Bench:
    def __init__(self, args: argparse.Namespace):
        from kubernetes import client, config

        from e2e.operator_proc import OperatorProcess

        self.args = args
        cls = scale_cluster_class()
        self.cluster = cls(args.state_dir, args.port_base)
        log(f"cluster in {self.cluster.dir} on port base {args.port_base} with {POOLS.name}")
        self.cluster.up(POOLS)
        self.audit = Audit(self.cluster.dir / "audit.log")
        self.api = config.new_client_from_config(str(self.cluster.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.crs = client.CustomObjectsApi(self.api)
        self.op = OperatorProcess(self.cluster, metrics_port=args.metrics_port)
        nodes = self.core.list_node().items
        self.n_nodes = len(nodes)
        log(f"{self.n_nodes} nodes; waiting until none has the node controller's not-ready taint")
        wait_until(lambda: self._tainted() == 0, 600, "nodes schedulable", every=3,
                   progress=lambda: f"{self._tainted()} tainted")

    def _tainted(self) -> int:
        return sum(1 for n in self.core.list_node().items
                   if any(t.key == "node.kubernetes.io/not-ready" for t in (n.spec.taints or [])))

    # -- namespaces

    def make_namespaces(self, names: list[str]) -> None:
        for ns in names:
            self.core.create_namespace({"metadata": {"name": ns, "labels": {"slmfleet.io/bench": "scale"}}})
            pv = f"{ns}-weights"
            self.core.create_persistent_volume({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": pv, "labels": {"slmfleet.io/bench": "scale"}},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                         "hostPath": {"path": tempfile.gettempdir()},
                         "claimRef": {"namespace": ns, "name": "weights"}}})
            self.core.create_namespaced_persistent_volume_claim(ns, {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights"},
                "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                         "resources": {"requests": {"storage": "1Gi"}}}})
        wait_until(lambda: all(self.core.read_namespaced_persistent_volume_claim("weights", ns).status.phase == "Bound"
                               for ns in names), 120, "claims bound", every=1)

    def clean(self) -> None:
        """Deletes every namespace and volume of the bench, and waits until they are gone."""
        from kubernetes.client.exceptions import ApiException

        sel = "slmfleet.io/bench=scale"
        for ns in self.core.list_namespace(label_selector=sel).items:
            try:
                self.core.delete_namespace(ns.metadata.name)
            except ApiException:
                pass
        wait_until(lambda: not self.core.list_namespace(label_selector=sel).items, 900, "bench namespaces deleted",
                   every=2, progress=lambda: f"{len(self.core.list_namespace(label_selector=sel).items)} left")
        self.core.delete_collection_persistent_volume(label_selector=sel)

    # -- operator

    def start_operator(self, install: bool = True) -> float:
        import e2e.operator_proc as op_mod

        t0 = time.monotonic()
        if install:
            self.op.start(timeout=900)
        else:
            real = op_mod.install
            op_mod.install = lambda cluster: None  # CRDs and RBAC are in place: time the operator only
            try:
                self.op.start(timeout=900)
            finally:
                op_mod.install = real
        return time.monotonic() - t0

    def settle(self, quiet: float = 5.0, timeout: float = 900) -> float:
        """Seconds until the operator's reconcile count has not moved for `quiet` seconds (minus those)."""
        t0 = time.monotonic()
        last, since = -1.0, time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                now_count = self.op.reconciles()
            except OSError:
                now_count = -2.0
            if now_count != last:
                last, since = now_count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return since - t0
            time.sleep(0.5)
        raise TimeoutError("operator never settled")

    def change(self, ns: str, name: str, replicas: int) -> float:
        self.crs.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                {"spec": {"serving": {"replicas": replicas}}})
        return time.monotonic()

    # -- the run

    def run(self, n: int) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        log(f"N={n}: cleaning up, then {len(namespaces(OP_PREFIX, n))} tenant namespaces")
        self.op.stop()
        self.clean()
        load_before = os.getloadavg()
        op_ns = namespaces(OP_PREFIX, n)
        self.make_namespaces(op_ns)
        bodies = model_bodies(n)
        watcher = Watcher(self.cluster.kubeconfig)
        result: dict[str, Any] = {"n_models": n, "n_nodes": self.n_nodes}
        try:
            self.start_operator()
            pid = self.op.proc.pid
            _, cpu_start = proc_stats(pid)
            profiler = self._start_profiler(pid, n) if self.args.profile else None
            mark = self.audit.mark()
            log(f"N={n}: operator up (pid {pid}); creating {n} SmallModels in one batch")
            t0 = time.monotonic()
            changes: list[dict[str, Any]] = []
            changer = threading.Thread(target=self._change_during_batch, args=(watcher, t0, n, changes), daemon=True)
            changer.start()

            def create(body: dict[str, Any]) -> None:
                self.crs.create_namespaced_custom_object(GROUP, VERSION, body["metadata"]["namespace"], PLURAL, body)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, bodies))
            created_s = time.monotonic() - t0
            log(f"N={n}: {n} SmallModels created in {created_s:.1f}s; waiting until all Ready")
            prefix = f"{OP_PREFIX}-"
            wait_until(lambda: watcher.count(watcher.ready, prefix) >= n, 3600, "all models Ready", every=1,
                       progress=lambda: (f"{watcher.count(watcher.ready, prefix)} Ready, "
                                         f"{watcher.count(watcher.dep_first, prefix)} Deployments, "
                                         f"{len(changes)} changes"))
            changer.join(timeout=600)
            # Changed models are Ready again at their new generation only when their Deployment scaled up.
            wait_until(lambda: watcher.count(watcher.ready, prefix) >= n and all(c.get("latency_s") is not None for c in changes),
                       600, "changed models applied", every=1)
            ready_s = watcher.last(watcher.ready, prefix) - t0
            apply_s = watcher.last(watcher.dep_first, prefix) - t0
            hwm, cpu_end = proc_stats(pid)
            if profiler is not None:
                result["profile"] = self._stop_profiler(profiler)
            entries = self.audit.entries(mark)
            writes = [e for e in entries if is_write(e)]
            lat = [c["latency_s"] for c in changes if c.get("latency_s") is not None]
            log(f"N={n}: all Ready in {ready_s:.1f}s, last Deployment at {apply_s:.1f}s, "
                f"{len(writes) / n:.2f} writes/model, RSS {hwm:.0f} MiB, CPU {cpu_end - cpu_start:.1f}s")
            result.update({
                "models_created_s": round(created_s, 2),
                "operator_all_ready_s": round(ready_s, 2),
                "operator_apply_s": round(apply_s, 2),
                "writes_per_model": convergence_writes(writes, n, {c["model"] for c in changes}),
                "writes_per_model_with_changes": round(len(writes) / n, 3),
                "writes_per_changed_model": round(sum(of_models(w, {c["model"] for c in changes}) for w in writes)
                                                  / max(1, len(changes)), 3),
                "writes_per_model_by_verb": requests_by_verb(writes, n),
                "requests_per_model": round(len(entries) / n, 3),
                "requests_per_model_by_verb": requests_by_verb(entries, n),
                "rss_mib": round(hwm, 1),
                "cpu_seconds": round(cpu_end - cpu_start, 2),
                "changes": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in c.items()} for c in changes],
                "change_latency_p50_s": _r(percentile(lat, 50)),
                "change_latency_p99_s": _r(percentile(lat, 99)),
            })

            # -- a restart after convergence: a no-op resync
            self.op.stop()
            mark = self.audit.mark()
            log(f"N={n}: restarting the operator (no-op resync)")
            result["restart_healthy_s"] = round(self.start_operator(install=False), 2)
            settled = self.settle()
            result["restart_settled_s"] = round(result["restart_healthy_s"] + settled, 2)
            time.sleep(2)
            resync = [e for e in self.audit.entries(mark) if is_write(e)]
            result["noop_resync_writes"] = len(resync)
            result["noop_resync_writes_by_verb"] = requests_by_verb(resync, 1) if resync else {}
            result["rss_after_restart_mib"] = round(proc_stats(self.op.proc.pid)[0], 1)
            log(f"N={n}: restart healthy in {result['restart_healthy_s']}s, settled in {result['restart_settled_s']}s, "
                f"{len(resync)} writes")

            # -- a change made as a restarted operator starts
            self.op.stop()
            target = next(b for b in bodies if f"{b['metadata']['namespace']}/{b['metadata']['name']}"
                          not in {c["model"] for c in changes})
            key = f"{target['metadata']['namespace']}/{target['metadata']['name']}"
            starter = threading.Thread(target=self.start_operator, kwargs={"install": False}, daemon=True)
            starter.start()
            wait_until(lambda: self.op.proc is not None and self.op.proc.pid != pid and self.op.proc.poll() is None,
                       60, "the restarted operator's process", every=0.05)
            t_change = self.change(target["metadata"]["namespace"], target["metadata"]["name"], 2)
            wait_until(lambda: watcher.dep_replicas.get(key, (0, 0))[0] == 2, 900, "the change after a restart")
            result["restart_change_s"] = round(watcher.dep_replicas[key][1] - t_change, 2)
            starter.join(timeout=900)
            log(f"N={n}: change after restart applied in {result['restart_change_s']}s")
            self.settle()

            # -- the raw floor: the same objects, applied directly
            objects = self._operator_objects(op_ns)
            self.op.stop()
            log(f"N={n}: raw floor: deleting the operator's namespaces, then applying "
                f"{sum(o['kind'] == 'Deployment' for o in objects)} Deployments and "
                f"{sum(o['kind'] == 'Service' for o in objects)} Services directly")
            self.clean()
            raw_ns = namespaces(RAW_PREFIX, n)
            self.make_namespaces(raw_ns)
            ns_map = dict(zip(op_ns, raw_ns, strict=True))
            copies = [raw_copy(o, ns_map[o["metadata"]["namespace"]]) for o in objects]
            raw_apply_s, raw_t0 = asyncio.run(self._raw_apply(copies))
            # The raw arm waits for the Deployments that were available in the operator's arm:
            # one scaled up by a change after the batch may have a replica its device class has
            # no room for (placement sizes one replica), and would never be available here either.
            n_deps = available_deployments(objects)
            result["raw_deployments_not_waited_for"] = sum(o["kind"] == "Deployment" for o in copies) - n_deps
            rprefix = f"{RAW_PREFIX}-"
            wait_until(lambda: watcher.count(watcher.dep_available, rprefix) >= n_deps, 3600, "raw Deployments available",
                       every=1, progress=lambda: f"{watcher.count(watcher.dep_available, rprefix)}/{n_deps} available")
            raw_ready_s = watcher.last(watcher.dep_available, rprefix) - raw_t0
            log(f"N={n}: raw: applied in {raw_apply_s:.1f}s, all available in {raw_ready_s:.1f}s")
            result.update({
                "raw_apply_s": round(raw_apply_s, 2),
                "raw_all_available_s": round(raw_ready_s, 2),
                "ratio_to_floor": ratio(ready_s, raw_ready_s),
                "apply_ratio_to_raw": ratio(apply_s, raw_apply_s),
            })
        except ApiException as exc:
            result["error"] = f"API error {exc.status}: {exc.reason}"
            raise
        finally:
            watcher.close()
            self.op.stop()
            result["load_average_before"] = [round(x, 2) for x in load_before]
            result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        return result

    def _change_during_batch(self, watcher: Watcher, t0: float, n: int, changes: list[dict[str, Any]]) -> None:
        """Every `--change-every` s while the batch converges (up to --changes), replicas 1 -> 2 on a model whose
        Deployment exists; each change's latency is when its Deployment shows 2."""
        prefix = f"{OP_PREFIX}-"
        changed: set[str] = set()
        while len(changes) < self.args.changes and watcher.count(watcher.ready, prefix) < n:
            time.sleep(self.args.change_every)
            with watcher.lock:
                candidates = sorted(k for k, (r, _) in watcher.dep_replicas.items()
                                    if k.startswith(prefix) and r == 1 and k not in changed)
            if candidates:
                key = candidates[len(candidates) // 2]
                ns, name = key.split("/")
                t = self.change(ns, name, 2)
                changed.add(key)
                changes.append({"model": key, "at_s": t - t0})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and any("latency_s" not in c for c in changes):
            for c in changes:
                seen = watcher.dep_replicas.get(c["model"])
                if "latency_s" not in c and seen and seen[0] == 2:
                    c["latency_s"] = seen[1] - t0 - c["at_s"]
            time.sleep(0.2)

    def _operator_objects(self, nss: list[str]) -> list[dict[str, Any]]:
        out = []
        for ns in nss:
            for svc in self.core.list_namespaced_service(ns, label_selector=MODEL_LABEL).items:
                out.append({"apiVersion": "v1", "kind": "Service", **self.api.sanitize_for_serialization(svc)})
            for dep in self.apps.list_namespaced_deployment(ns, label_selector=MODEL_LABEL).items:
                out.append({"apiVersion": "apps/v1", "kind": "Deployment", **self.api.sanitize_for_serialization(dep)})
        return out

    async def _raw_apply(self, objects: list[dict[str, Any]]) -> tuple[float, float]:
        """Applies Services then each model's Deployment, all at once through the operator's client;
        seconds until the last Deployment is applied, and the start time."""
        from slmfleet.k8s.client import KubeClient

        kube = KubeClient(str(self.cluster.user_kubeconfig("slmfleet-operator")))
        t0 = time.monotonic()
        done: list[float] = []

        async def one(obj: dict[str, Any]) -> None:
            await kube.apply(obj)
            if obj["kind"] == "Deployment":
                done.append(time.monotonic())

        try:
            order = sorted(objects, key=lambda o: o["kind"] != "Service")
            await asyncio.gather(*(one(o) for o in order))
        finally:
            await kube.close()
        return max(done) - t0, t0

    # -- profiling

    def _start_profiler(self, pid: int, n: int) -> tuple[subprocess.Popen, Path]:
        out = REPO / "bench" / "results" / f"scale-profile-n{n}.speedscope.json"
        spy = Path(sys.executable).parent / "py-spy"
        proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "speedscope", "--rate", "50",
                                 "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                                stderr=open(self.cluster.dir / "logs" / f"py-spy-{n}.log", "wb"))
        return proc, out

    def _stop_profiler(self, profiler: tuple[subprocess.Popen, Path]) -> dict[str, Any]:
        proc, out = profiler
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if out.exists():
            return {"file": str(out.relative_to(REPO)), "tool": "py-spy record --format speedscope --rate 50"}
        log_text = (self.cluster.dir / "logs").joinpath(f"py-spy-{out.name}").name
        return {"file": None, "note": f"py-spy wrote nothing (exit {proc.returncode}); see its log {log_text}"}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def git_commit() -> dict[str, Any]:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "operator"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return {"commit": head, "operator_tree_dirty": bool(dirty)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[100, 1000], help="numbers of SmallModels (100,1000)")
    parser.add_argument("--port-base", type=int, default=24443)
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("SLMFLEET_SCALE_DIR", Path.home() / ".cache" / "slmfleet-scale" / "cluster")))
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument("--keep-cluster", action="store_true", help="leave the cluster up at the end")
    parser.add_argument("--profile", action="store_true", help="py-spy the operator during convergence")
    parser.add_argument("--changes", type=int, default=20, help="spec changes during the batch")
    parser.add_argument("--change-every", type=float, default=3.0, help="seconds between them")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    started = time.monotonic()
    pools = pools_summary(yaml.safe_load(POOLS.read_text()))
    bench = Bench(args)
    runs = []
    try:
        for n in args.sizes:
            runs.append(bench.run(n))
            _write(args, pools, bench, runs, started)
    finally:
        try:
            bench.op.stop()
            bench.clean()
        finally:
            if not args.keep_cluster:
                bench.cluster.down()
    _write(args, pools, bench, runs, started)
    print(json.dumps({r["n_models"]: {k: r.get(k) for k in ("ratio_to_floor", "apply_ratio_to_raw", "writes_per_model",
                                                            "rss_mib", "restart_healthy_s", "change_latency_p99_s")}
                      for r in runs}, indent=2))
    return 0


def _write(args: argparse.Namespace, pools: dict[str, Any], bench: Bench, runs: list[dict[str, Any]], started: float) -> None:
    flag = kcm_qps_flag(bench.cluster)
    doc = {
        "benchmark": "scale",
        "what": __doc__.split("\n\n")[1].replace("\n", " ").strip(),
        "pools": {"file": str(POOLS.relative_to(REPO)), **pools},
        "controller_manager_client_qps": {
            "value": KCM_CLIENT_QPS if not flag else flag,
            "note": "kube-controller-manager's --kube-api-qps left at its default (20) for both the operator run "
                    "and the raw floor" if not flag else "set on the command line",
        },
        "operator": {"metrics_port": args.metrics_port, "user": "slmfleet-operator (deploy/rbac.yaml)",
                     "workers": "operator default"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "shared": "other engineers' tests run on this machine at the same time: see load averages"},
        "git": git_commit(),
        "wall_seconds": round(time.monotonic() - started, 1),
        "runs": runs,
        "goals": goals_table(runs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
