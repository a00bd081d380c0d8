"""`python -m e2e.node_agent --node NAME --kubeconfig FILE --state-dir DIR --pod-cidr CIDR [--registry HOST:PORT]`"""

import argparse
import asyncio
import logging
from pathlib import Path

from e2e.node_agent.agent import NodeAgent


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.node_agent", description="kubelet stand-in running pods as local processes"
    )
    parser.add_argument("--node", required=True)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--pod-cidr", required=True)
    parser.add_argument("--registry", help="host:port of the cluster's loopback OCI registry (the only one pulls reach)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(NodeAgent(args.node, args.kubeconfig, args.state_dir, args.pod_cidr, args.registry).run())


if __name__ == "__main__":
    main()
