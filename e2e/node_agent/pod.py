"""One pod on a process node: volumes, init containers in order, then the containers as local
processes, probes, restarts with back-off, honest status, and graceful deletion."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from e2e.cluster import MARKER_ENV
from e2e.node_agent import images, spec
from e2e.node_agent.kube import ApiError
from e2e.node_agent.registry import PullError, docker_config_auth, parse_reference

if TYPE_CHECKING:
    from e2e.node_agent.agent import NodeAgent

log = logging.getLogger("node-agent")

# Short names of the pods' directories, by pod IP (unique on the machine: every node has its own pod
# CIDR, every cluster its own octets). A Unix socket's path is at most 107 bytes, and the pods'
# volumes lie deep in the state dir: vLLM's ZeroMQ `ipc://` sockets in a pod's /tmp
# (VLLM_RPC_BASE_PATH) would not fit. A container path is rewritten to the volume's path under the
# pod's short name, a symlink to the pod's directory (root only: /run is root's).
SHORT_DIRS = Path("/run/slmfleet-pods")


class ConfigError(Exception):
    """A container cannot be configured (missing Secret key, unsupported volume...)."""


@dataclass
class ContainerState:
    name: str
    image: str
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "PodInitializing"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    process: asyncio.subprocess.Process | None = None
    container_id: str = ""
    image_id: str = ""  # set once the image is pulled (or found preloaded)

    def as_status(self) -> dict[str, Any]:
        status = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class PodRunner:
    def __init__(self, agent: NodeAgent, pod: dict[str, Any], ip: str):
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.ip = ip
        self.dir = agent.state_dir / "pods" / self.uid
        self.short_dir = SHORT_DIRS / ip if os.geteuid() == 0 else None
        self.spec = pod["spec"]
        self.restart_policy = self.spec.get("restartPolicy", "Always")
        self.init = [ContainerState(c["name"], c["image"]) for c in self.spec.get("initContainers") or []]
        self.main = [ContainerState(c["name"], c["image"], state={"waiting": {"reason": "PodInitializing"}})
                     for c in self.spec.get("containers") or []]
        self.initialized = False
        self.init_failed = False
        self.start_time = spec.now()
        self.terminating = False
        self._tasks: list[asyncio.Task] = []
        self._status_lock = asyncio.Lock()
        self._volume_paths: dict[str, str] = {}
        self._pulled: dict[str, images.ImageSpec] = {}  # container name -> its image, once pulled
        # Condition type -> (status, lastTransitionTime): the time moves only when the status does.
        self._transitions: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        main_states = [c.state for c in self.main]
        phase = spec.pod_phase(self.restart_policy, self.init_failed, main_states if self.initialized else [])
        all_ready = self.initialized and all(c.ready for c in self.main)
        now = spec.now()

        def cond(kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
            status = "True" if ok else "False"
            previous = self._transitions.get(kind)
            since = previous[1] if previous and previous[0] == status else now
            self._transitions[kind] = (status, since)
            c = {"type": kind, "status": status, "lastTransitionTime": since, "lastProbeTime": None}
            if reason and not ok:
                c["reason"] = reason
            return c

        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("Initialized", self.initialized, "ContainersNotInitialized"),
                cond("Ready", all_ready, "ContainersNotReady"),
                cond("ContainersReady", all_ready, "ContainersNotReady"),
                cond("PodScheduled", True),
            ],
            "initContainerStatuses": [c.as_status() for c in self.init],
            "containerStatuses": [c.as_status() for c in self.main],
        }

    async def push_status(self) -> None:
        """Writes the whole status (merge patch replaces the lists) unless the pod is gone."""
        async with self._status_lock:
            try:
                await self.agent.kube.request(
                    "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                    {"status": self.status()}, content_type="application/merge-patch+json")
            except ApiError as exc:
                if exc.status not in (404, 409):
                    log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("pod %s/%s: status update failed: %r", self.namespace, self.name, exc)

    async def event(self, reason: str, message: str, kind: str = "Normal") -> None:
        await self.agent.event(self.pod, reason, message, kind)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name=f"pod-{self.name}"))

    def _link_short_dir(self) -> None:
        if self.short_dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.short_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.short_dir.with_name(self.short_dir.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.dir)
        tmp.replace(self.short_dir)  # a link a stopped agent left for this IP is replaced

    def _unlink_short_dir(self) -> None:
        try:
            if self.short_dir is not None and os.readlink(self.short_dir) == str(self.dir):
                self.short_dir.unlink()
        except OSError:
            pass

    def _short(self, host: str) -> str:
        """`host` under the pod's short name when it lies in the pod's directory."""
        if self.short_dir is None or not (host == str(self.dir) or host.startswith(str(self.dir) + os.sep)):
            return host
        return str(self.short_dir) + host[len(str(self.dir)):]

    async def _run(self) -> None:
        try:
            self._link_short_dir()
            await self.push_status()
            if not await self._mount_volumes():
                return
            for c_spec, c in zip(self.spec.get("initContainers") or [], self.init, strict=True):
                if not await self._run_init(c_spec, c):
                    return
            self.initialized = True
            for c in self.main:
                c.state = {"waiting": {"reason": "ContainerCreating"}}
            await self.push_status()
            supervisors = [asyncio.create_task(self._supervise(c_spec, c))
                           for c_spec, c in zip(self.spec["containers"], self.main, strict=True)]
            self._tasks.extend(supervisors)
            await asyncio.gather(*supervisors)
            await self.push_status()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must show in the agent log, not vanish
            log.exception("pod %s/%s: runner failed", self.namespace, self.name)

    async def _mount_volumes(self) -> bool:
        """Prepares the volumes, retrying with back-off as the kubelet's volume manager does: the
        ConfigMap `kube-root-ca.crt` of a new namespace, a Secret or a claim's binding may come a
        moment after the pod. The containers wait in ContainerCreating meanwhile. False: the pod
        was deleted first."""
        retry = 0
        while not self.terminating:
            try:
                await self._prepare_volumes()
                return True
            except (ConfigError, ApiError) as exc:
                if retry == 0:
                    for c in self.init + self.main:
                        c.state = {"waiting": {"reason": "ContainerCreating"}}
                    await self.push_status()
                    await self.event("FailedMount", f"MountVolume.SetUp failed: {exc}", "Warning")
                retry += 1
                if await self._terminating_within(min(2.0 ** retry, 10.0)):
                    return False
        return False

    async def _run_init(self, c_spec: dict, c: ContainerState) -> bool:
        while not self.terminating:
            code = await self._run_once(c_spec, c, probes=False)
            if code == 0:
                return True
            if self.terminating:
                return False
            if self.restart_policy == "Never":
                self.init_failed = True
                await self.push_status()
                return False
            await self._back_off(c)
        return False

    async def _supervise(self, c_spec: dict, c: ContainerState) -> None:
        while not self.terminating:
            code = await self._run_once(c_spec, c, probes=True)
            if self.terminating:
                return
            if self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0):
                await self.push_status()
                return
            await self._back_off(c)

    async def _back_off(self, c: ContainerState) -> None:
        c.last_state = {"terminated": c.state.get("terminated", {})} if "terminated" in c.state else c.last_state
        c.restart_count += 1
        delay = spec.backoff_seconds(c.restart_count)
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {int(delay)}s restarting failed container={c.name} pod={self.name}"}}
        await self.push_status()
        await self.event("BackOff", f"Back-off restarting failed container {c.name} in pod {self.name}", "Warning")
        await asyncio.sleep(delay)

    # ------------------------------------------------------------------ one process run

    async def _run_once(self, c_spec: dict, c: ContainerState, probes: bool) -> int | None:
        cdir = self.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term_path = c_spec.get("terminationMessagePath") or spec.DEFAULT_TERMINATION_MESSAGE_PATH
        term_file = cdir / "termination-log"
        term_file.write_text("")
        image = await self._pull(c_spec, c)
        if image is None:
            return None
        retry = 0
        while True:
            try:
                env, argv, paths = await self._command(c_spec, c, image, term_path, term_file)
                break
            except (ConfigError, ApiError, ValueError) as exc:
                # As the kubelet does: a Secret or ConfigMap may appear, the API may answer next time.
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                await self.push_status()
                if retry == 0:
                    await self.event("Failed", f"Error: {exc}", "Warning")
                retry += 1
                if await self._terminating_within(min(2.0 ** retry, 10.0)):
                    return None
            except images.ExecError as exc:
                now = spec.now()
                c.state = {"terminated": spec.terminated_state(128, now, now, str(exc), "", reason="StartError")}
                await self.push_status()
                await self.event("Failed", f"Error: {exc}", "Warning")
                return 128

        workdir = c_spec.get("workingDir")
        cwd = paths.rewrite(workdir) if workdir else str(self.dir)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # mount namespaces need root; without them the fixed path stays unmounted
            # and readOnlyRootFilesystem is not enforced.
            argv = spec.mount_namespace_argv(paths.mounts, argv, self._read_only_mounts(c_spec),
                                             read_only_root=self._read_only_root(c_spec), private_shm=True)
        logf = open(cdir / "output.log", "ab")
        c.container_id = f"process://{self.uid}/{c.name}/{c.restart_count}"
        started_at = spec.now()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True)
        except OSError as exc:
            logf.close()
            c.state = {"terminated": spec.terminated_state(128, started_at, spec.now(), str(exc), c.container_id,
                                                           reason="StartError")}
            await self.push_status()
            return 128
        c.process = proc
        c.state = {"running": {"startedAt": started_at}}
        has_readiness = bool(c_spec.get("readinessProbe"))
        has_startup = bool(c_spec.get("startupProbe"))
        c.started = not has_startup
        c.ready = not has_readiness and not has_startup
        await self.push_status()
        await self.event("Started", f"Started container {c.name}")
        probe_task = asyncio.create_task(self._probe(c_spec, c, proc)) if probes else None
        try:
            rc = await proc.wait()
        finally:
            # As a container's end ends its pid namespace: what the process started (vLLM's engine
            # and worker processes, in its process group) does not outlive it.
            self._kill(proc, signal.SIGKILL)
            if probe_task:
                probe_task.cancel()
            logf.close()
            c.process = None
        code = spec.exit_code(rc)
        message = term_file.read_text(errors="replace").strip() if term_file.exists() else ""
        if not message and code != 0 and c_spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (cdir / "output.log").read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        c.ready = False
        c.started = False
        c.state = {"terminated": spec.terminated_state(code, started_at, spec.now(), message, c.container_id)}
        await self.push_status()
        return code

    async def _command(self, c_spec: dict, c: ContainerState, image: images.ImageSpec, term_path: str,
                       term_file: Path) -> tuple[dict[str, str], list[str], spec.PathMap]:
        """The container's environment, argv and path map, as the pod's spec, its image and its
        volumes make them."""
        self._check_non_root(c_spec, image)
        env = await self._env(c_spec, image)
        paths = spec.PathMap({**self._mounts(c_spec), term_path: str(term_file)})
        if env.get("HOME") == image.env.get("HOME") and paths.host_path(env["HOME"]) is None:
            # Without the image's file system its HOME (say /home/nonroot) is not there: the
            # pod's own home directory stands in, unless the HOME is a volume of the pod.
            env["HOME"] = str(self.dir / "home")
        if spec.TMP_DIR in paths.mounts:
            # Programs find /tmp without being told (tempfile's default): in a container that is the
            # volume mounted there, here it would be the host's (read-only with a read-only root).
            env.setdefault("TMPDIR", spec.TMP_DIR)
        argv = images.resolve_argv(image, [spec.expand(a, env) for a in c_spec.get("command") or []] or None,
                                   [spec.expand(a, env) for a in c_spec["args"]] if "args" in c_spec else None)
        argv = [argv[0]] + [paths.rewrite(a) for a in argv[1:]]
        if image.real_vllm:
            argv = images.real_vllm_argv(argv, self.ip)
        return spec.container_env(env, paths, self._host_env()), argv, paths

    async def _terminating_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.terminating and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self.terminating

    async def _wait_terminating(self) -> None:
        while not self.terminating:
            await asyncio.sleep(1)

    # ------------------------------------------------------------------ probes

    async def _probe(self, c_spec: dict, c: ContainerState, proc: asyncio.subprocess.Process) -> None:
        startup = c_spec.get("startupProbe")
        if startup:
            if not await self._probe_until(startup, c_spec):
                await self.event("Unhealthy", f"Startup probe failed for container {c.name}", "Warning")
                self._kill(proc)
                return
            c.started = True
            c.ready = not c_spec.get("readinessProbe")
            await self.push_status()
        tasks = []
        if c_spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self._readiness(c_spec["readinessProbe"], c_spec, c)))
        if c_spec.get("livenessProbe"):
            tasks.append(asyncio.create_task(self._liveness(c_spec["livenessProbe"], c_spec, c, proc)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _probe_until(self, probe: dict, c_spec: dict) -> bool:
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        failures = 0
        while True:
            if await self._check(probe, c_spec):
                return True
            failures += 1
            if failures >= probe.get("failureThreshold", 3):
                return False
            await asyncio.sleep(probe.get("periodSeconds", 10))

    async def _readiness(self, probe: dict, c_spec: dict, c: ContainerState) -> None:
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        successes = failures = 0
        while True:
            ok = await self._check(probe, c_spec)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if ok and not c.ready and successes >= probe.get("successThreshold", 1):
                c.ready = True
                await self.push_status()
            elif not ok and c.ready and failures >= probe.get("failureThreshold", 3):
                c.ready = False
                await self.push_status()
                await self.event("Unhealthy", f"Readiness probe failed for container {c.name}", "Warning")
            await asyncio.sleep(probe.get("periodSeconds", 10))

    async def _liveness(self, probe: dict, c_spec: dict, c: ContainerState, proc) -> None:
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        failures = 0
        while True:
            failures = 0 if await self._check(probe, c_spec) else failures + 1
            if failures >= probe.get("failureThreshold", 3):
                await self.event("Killing", f"Container {c.name} failed liveness probe, will be restarted", "Warning")
                self._kill(proc)
                return
            await asyncio.sleep(probe.get("periodSeconds", 10))

    def _port(self, port: Any, c_spec: dict) -> int:
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for p in c_spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"named port {port!r} not found")

    async def _check(self, probe: dict, c_spec: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                scheme = h.get("scheme", "HTTP").lower()
                url = f"{scheme}://{h.get('host') or self.ip}:{self._port(h['port'], c_spec)}{h.get('path', '/')}"
                headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
                async with self.agent.probes.get(url, headers=headers, ssl=False, allow_redirects=False,
                                                 timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                t = probe["tcpSocket"]
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(t.get("host") or self.ip, self._port(t["port"], c_spec)), timeout)
                writer.close()
                return True
            if "exec" in probe:
                image = self._pulled.get(c_spec["name"])
                if image is None:
                    return False
                argv = images.resolve_argv(image, probe["exec"]["command"], None)
                proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=asyncio.subprocess.DEVNULL)
                return await asyncio.wait_for(proc.wait(), timeout) == 0
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, images.ExecError):
            return False
        return False

    # ------------------------------------------------------------------ images

    async def _pull(self, c_spec: dict, c: ContainerState) -> images.ImageSpec | None:
        """The container's image, pulled as the kubelet pulls it: preloaded images and images
        this node already has (unless the policy is Always) are not pulled again; a failed pull
        shows as ErrImagePull, then ImagePullBackOff, and is retried with back-off. None: the pod
        was deleted first."""
        image = c.image
        policy = c_spec.get("imagePullPolicy") or spec.default_pull_policy(image)
        local = images.preloaded(image) or (self.agent.pulled.get(image) if policy != "Always" else None)
        if local is not None:
            await self.event("Pulled", f'Container image "{image}" already present on machine')
            return self._pulled_as(c_spec, c, local)
        if policy == "Never":
            message = f'Container image "{image}" is not present with pull policy of Never'
            c.state = {"waiting": {"reason": "ErrImageNeverPull", "message": message}}
            await self.push_status()
            await self.event("ErrImageNeverPull", message, "Warning")
            await self._wait_terminating()
            return None
        failures = 0
        while not self.terminating:
            await self.event("Pulling", f'Pulling image "{image}"')
            started = time.monotonic()
            try:
                pulled = await self.agent.registry.pull(self.agent.http, image, await self._pull_auth(image))
            except PullError as exc:
                failures += 1
                c.state = {"waiting": {"reason": "ErrImagePull", "message": str(exc)}}
                await self.push_status()
                await self.event("Failed", f'Failed to pull image "{image}": {exc}', "Warning")
                await self.event("Failed", "Error: ErrImagePull", "Warning")
                if await self._terminating_within(1.0):
                    return None
                delay = spec.backoff_seconds(failures)
                c.state = {"waiting": {"reason": "ImagePullBackOff",
                                       "message": f'Back-off pulling image "{image}": ErrImagePull: {exc}'}}
                await self.push_status()
                await self.event("BackOff", f'Back-off pulling image "{image}"')
                await self.event("Failed", "Error: ImagePullBackOff", "Warning")
                if await self._terminating_within(delay):
                    return None
                continue
            seconds = time.monotonic() - started
            await self.event("Pulled", f'Successfully pulled image "{image}" in {seconds:.3f}s '
                                       f'({seconds:.3f}s including waiting). Image size: {pulled.size} bytes.')
            local = images.from_pulled(pulled)
            self.agent.pulled[image] = local
            return self._pulled_as(c_spec, c, local)
        return None

    def _pulled_as(self, c_spec: dict, c: ContainerState, image: images.ImageSpec) -> images.ImageSpec:
        c.image_id = image.image_id
        self._pulled[c_spec["name"]] = image
        return image

    async def _pull_auth(self, image: str) -> str | None:
        """The credentials of the pod's imagePullSecrets for the image's registry, read as the
        kubelet reads them: a Secret that cannot be read is reported, and the pull goes on."""
        names = [ref.get("name", "") for ref in self.spec.get("imagePullSecrets") or []]
        found, missing = [], []
        for name in names:
            try:
                found.append(await self._config_data("secrets", name, optional=False))
            except (ConfigError, ApiError):
                missing.append(name)
        if missing:
            await self.event("FailedToRetrieveImagePullSecret",
                             f"Unable to retrieve some image pull secrets ({', '.join(missing)}); attempting to "
                             "pull the image may not succeed.", "Warning")
        return docker_config_auth(found, parse_reference(image).registry)

    def _check_non_root(self, c_spec: dict, image: images.ImageSpec) -> None:
        """runAsNonRoot as the kubelet verifies it, against the image's User when the pod sets no uid."""
        pod_sc, c_sc = self.spec.get("securityContext") or {}, c_spec.get("securityContext") or {}
        non_root = c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if not non_root:
            return
        uid = c_sc.get("runAsUser", pod_sc.get("runAsUser"))
        root, error = images.runs_as_root(image, uid)
        if error:
            raise ConfigError(error)
        if root:
            raise ConfigError("container has runAsNonRoot and image will run as root "
                              f"(pod: \"{self.name}_{self.namespace}({self.uid})\", container: {c_spec['name']})")

    @staticmethod
    def _read_only_root(c_spec: dict) -> bool:
        return bool((c_spec.get("securityContext") or {}).get("readOnlyRootFilesystem"))

    @staticmethod
    def _read_only_mounts(c_spec: dict) -> set[str]:
        return {m["mountPath"].rstrip("/") or "/" for m in c_spec.get("volumeMounts") or [] if m.get("readOnly")}

    # ------------------------------------------------------------------ env and volumes

    def _host_env(self) -> dict[str, str]:
        """What the runtime sets to paths of the host (never rewritten as container paths)."""
        host = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir / "home"),
                "PYTHONPATH": str(images.REPO)}
        if MARKER_ENV in os.environ:  # the cluster's state dir
            host[MARKER_ENV] = os.environ[MARKER_ENV]
        return host

    async def _env(self, c_spec: dict, image: images.ImageSpec) -> dict[str, str]:
        # The image's Env first, then what the runtime adds, then the pod spec's: the runtime's order.
        host = self._host_env()
        env = {
            "PATH": host["PATH"],
            "HOME": host["HOME"],
            **image.env,
            "HOSTNAME": self.name,
            "LANG": "C.UTF-8",
            "PYTHONPATH": host["PYTHONPATH"],
            "PYTHONUNBUFFERED": "1",
            "SLMFLEET_POD_IP": self.ip,
            # As the kubelet gives every container: the API server behind the `kubernetes` Service.
            # There is no kube-proxy here, so it is the address that Service leads to.
            "KUBERNETES_SERVICE_HOST": self.agent.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port),
        }

        # The marker lets `cluster down` find pod processes even if this agent is gone.
        if MARKER_ENV in host:
            env[MARKER_ENV] = host[MARKER_ENV]
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        user: dict[str, str] = {}
        if self.spec.get("enableServiceLinks", True):
            services = await self.agent.kube.get(f"/api/v1/namespaces/{self.namespace}/services")
            user.update(spec.service_link_env(services["items"]))
        for src in c_spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = await self._config_data("configmaps", src["configMapRef"]["name"], src["configMapRef"].get("optional"))
            else:
                data = await self._config_data("secrets", src["secretRef"]["name"], src["secretRef"].get("optional"))
            user.update({prefix + k: v for k, v in data.items()})
        if image.real_vllm:
            # The real vLLM is not this checkout's code: nothing of the checkout on its path.
            env.pop("PYTHONPATH", None)
        for var in c_spec.get("env") or []:
            if "valueFrom" not in var:
                user[var["name"]] = spec.expand(var.get("value", ""), user)
                continue
            src = var["valueFrom"]
            if "fieldRef" in src:
                pod = dict(self.pod, status={"podIP": self.ip, "podIPs": [{"ip": self.ip}], "hostIP": "127.0.0.1",
                                             "hostIPs": [{"ip": "127.0.0.1"}]})
                user[var["name"]] = spec.field_ref(pod, src["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in src or "secretKeyRef" in src:
                kind, ref = (
                    ("configmaps", src["configMapKeyRef"])
                    if "configMapKeyRef" in src
                    else ("secrets", src["secretKeyRef"])
                )
                data = await self._config_data(kind, ref["name"], ref.get("optional"))
                if ref["key"] in data:
                    user[var["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind[:-1]} {self.namespace}/{ref['name']}")
            elif "resourceFieldRef" in src:
                resource = src["resourceFieldRef"]["resource"]
                kind, name = resource.split(".", 1)
                user[var["name"]] = str((c_spec.get("resources") or {}).get(kind, {}).get(name, "0"))
        env.update(user)
        if image.real_vllm:
            env.update(images.real_vllm_env(self.ip))
        return env

    async def _config_data(self, kind: str, name: str, optional: bool | None) -> dict[str, str]:
        obj = await self.agent.kube.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}", ok_missing=True)
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{kind[:-1]} "{name}" not found')
        data = dict(obj.get("data") or {})
        if kind == "secrets":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        else:
            data.update({k: base64.b64decode(v).decode() for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _mounts(self, c_spec: dict) -> dict[str, str]:
        mounts = {}
        for m in c_spec.get("volumeMounts") or []:
            base = self._volume_paths.get(m["name"])
            if base is None:
                raise ConfigError(f"volume {m['name']!r} is not defined in the pod")
            host = self._short(os.path.join(base, m["subPath"]) if m.get("subPath") else base)
            Path(host).mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = host
        return mounts

    async def _prepare_volumes(self) -> None:
        for vol in self.spec.get("volumes") or []:
            name = vol["name"]
            target = self.dir / "volumes" / name
            if "emptyDir" in vol:
                # medium: Memory is a tmpfs on a real node; a directory is equivalent here.
                target.mkdir(parents=True, exist_ok=True)
                self._volume_paths[name] = str(target)
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                    path.mkdir(parents=True, exist_ok=True)
                self._volume_paths[name] = str(path)
            elif "configMap" in vol or "secret" in vol:
                kind = "configmaps" if "configMap" in vol else "secrets"
                src = vol.get("configMap") or vol.get("secret")
                data = await self._config_data(kind, src.get("name") or src.get("secretName"), src.get("optional"))
                self._write_items(target, data, src.get("items"))
                self._volume_paths[name] = str(target)
            elif "projected" in vol:
                target.mkdir(parents=True, exist_ok=True)
                for source in vol["projected"].get("sources") or []:
                    await self._project(target, source)
                self._volume_paths[name] = str(target)
            elif "downwardAPI" in vol:
                target.mkdir(parents=True, exist_ok=True)
                await self._project(target, {"downwardAPI": vol["downwardAPI"]})
                self._volume_paths[name] = str(target)
            elif "persistentVolumeClaim" in vol:
                self._volume_paths[name] = await self._pvc_path(vol["persistentVolumeClaim"]["claimName"])
            else:
                raise ConfigError(f"volume {name!r}: type {sorted(k for k in vol if k != 'name')} not supported on process nodes")

    async def _pvc_path(self, claim: str) -> str:
        """A claim bound to a hostPath or local PersistentVolume mounts that directory."""
        pvc = await self.agent.kube.get(f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim}", ok_missing=True)
        if pvc is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
        volume = (pvc.get("spec") or {}).get("volumeName")
        if not volume:
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        pv = await self.agent.kube.get(f"/api/v1/persistentvolumes/{volume}")
        source = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not source:
            raise ConfigError(f"persistentvolume {volume}: only hostPath and local volumes are supported on process nodes")
        return source["path"]

    def _write_items(self, target: Path, data: dict[str, str], items: list[dict] | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key in data:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(data[key])

    async def _project(self, target: Path, source: dict) -> None:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            sa = self.spec.get("serviceAccountName", "default")
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"audiences": [sat["audience"]] if sat.get("audience") else None,
                             "expirationSeconds": sat.get("expirationSeconds", 3607),
                             "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}}
            token = await self.agent.kube.request(
                "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body)
            (target / sat.get("path", "token")).write_text(token["status"]["token"])
        elif "configMap" in source or "secret" in source:
            kind = "configmaps" if "configMap" in source else "secrets"
            src = source.get("configMap") or source.get("secret")
            data = await self._config_data(kind, src["name"], src.get("optional"))
            self._write_items(target, data, src.get("items"))
        elif "downwardAPI" in source:
            pod = dict(self.pod, status={"podIP": self.ip, "hostIP": "127.0.0.1"})
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    (target / item["path"]).write_text(spec.field_ref(pod, item["fieldRef"]["fieldPath"]))

    # ------------------------------------------------------------------ deletion

    def _kill(self, proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    async def terminate(self, grace: float) -> None:
        """SIGTERM every process, wait out the grace period, SIGKILL what is left."""
        if self.terminating:
            return
        self.terminating = True
        procs = [c.process for c in self.init + self.main if c.process is not None]
        for c in self.main + self.init:
            if c.process is not None:
                await self.event("Killing", f"Stopping container {c.name}")
        for p in procs:
            self._kill(p, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout=max(grace, 0.1))
        except TimeoutError:
            for p in procs:
                self._kill(p, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._unlink_short_dir()

    def kill_now(self) -> None:
        for c in self.init + self.main:
            if c.process is not None:
                self._kill(c.process, signal.SIGKILL)
        for t in self._tasks:
            t.cancel()
        self._unlink_short_dir()
