"""`slmfleet operator run`: the operator process (kopf), with /healthz and Prometheus /metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from slmfleet.api.config import OperatorConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("operator", help="run the operator")
    commands = parser.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="watch SmallModels and reconcile them")
    run.add_argument(
        "--config",
        type=Path,
        required=True,
        help="operator config YAML (the Helm chart renders it; e2e/operator-config.yaml for the local cluster)",
    )
    run.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch only this namespace (repeatable); default: all"
    )
    run.add_argument("--kubeconfig", help="kubeconfig file; default: $KUBECONFIG, ~/.kube/config, or in-cluster")
    run.add_argument("--metrics-host", default="0.0.0.0", help="address for /healthz and /metrics")
    run.add_argument("--metrics-port", type=int, default=8080)
    run.add_argument("--pending-timeout", type=int, help="override pendingTimeoutSeconds from the config")
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=run_operator)


def load_config(path: Path, pending_timeout: int | None = None) -> OperatorConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    if pending_timeout is not None:
        raw["pendingTimeoutSeconds"] = pending_timeout
    return OperatorConfig.model_validate(raw)


def run_operator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.pending_timeout)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        print(f"slmfleet operator: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        # kopf authenticates from $KUBECONFIG; the write client reads the same file.
        os.environ["KUBECONFIG"] = args.kubeconfig
    keep_kubernetes_package_out()
    # Imported here so that `slmfleet size`/`pin` do not pay for kopf's import.
    from slmfleet.controller.leader import LeadershipLost, NoLeaseNamespace
    from slmfleet.controller.main import run
    from slmfleet.k8s.connection import ConfigError

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(
            config,
            namespaces=args.namespace or config.namespaces,
            kubeconfig=args.kubeconfig,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            stop=stop,
        )

    try:
        asyncio.run(main())
    except ConfigError as exc:
        print(f"slmfleet operator: {exc}", file=sys.stderr)
        return 2
    except NoLeaseNamespace as exc:
        print(f"slmfleet operator: {exc}", file=sys.stderr)
        return 2
    except LeadershipLost as exc:
        # Fatal by design (controller/leader.py): restarted, the process comes back as a follower.
        logging.getLogger("slmfleet.leader").error("%s: exiting", exc)
        return 1
    return 0


def keep_kubernetes_package_out() -> None:
    """kopf imports the kubernetes package whenever it is installed, only to recognise its model
    objects, which the operator never hands it; the import alone is about 50 MiB of the process
    (a thousand generated classes). The operator reaches the API through slmfleet.k8s alone, so in
    its process the package is marked as absent, and kopf's optional import finds nothing."""
    if "kubernetes" not in sys.modules:
        sys.modules["kubernetes"] = None  # type: ignore[assignment]
