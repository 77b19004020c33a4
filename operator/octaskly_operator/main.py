"""`octaskly-operator`: run the operator against the current kubeconfig (or in-cluster
service account), in all namespaces or the ones given."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="octaskly-operator",
        description="Kubernetes operator for OctasklyCluster resources (octaskly.io/v1alpha1).",
    )
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)"
    )
    p.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL (empty: none)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # before the clients read it
    try:
        import kopf

        from octaskly_operator import handlers
    except ImportError as exc:
        print(
            f"octaskly-operator: {exc}; install the operator extra: "
            "pip install 'octaskly[operator]'",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handlers.configure(kubeconfig=args.kubeconfig, namespaces=list(args.namespace))
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=list(args.namespace),
            standalone=True,  # one replica (Deployment strategy Recreate): no peering needed
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
