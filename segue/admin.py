"""`segue worker-admin`: operator calls to one worker (authenticated with the cluster token
like the rest of the request plane)."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from segue.auth import client_headers, load_cluster_token
from segue.protocol import Route


def add_admin_args(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    m = verbs.add_parser(
        "move",
        help="move running requests to other workers, live with their KV where the engine "
        "can export it (rebalancing, rolling restarts)",
    )
    m.add_argument("--worker", required=True, help="the worker's URL (as in discovery)")
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("--count", type=int, help="this many running requests (newest first)")
    which.add_argument("--request-id", help="this request")
    m.add_argument(
        "--cluster-token-file", help="the deployment's cluster token (or $SEGUE_CLUSTER_TOKEN)"
    )


def run_admin(args: argparse.Namespace) -> int:
    body = {"request_id": args.request_id} if args.request_id else {"count": args.count}
    headers = {"Content-Type": "application/json"}
    headers.update(client_headers(load_cluster_token(args.cluster_token_file)))
    req = urllib.request.Request(
        args.worker.rstrip("/") + Route.ADMIN_MOVE, json.dumps(body).encode(), headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            print(r.read().decode())
            return 0
    except urllib.error.HTTPError as e:
        print(f"{args.worker}: HTTP {e.code}: {e.read().decode(errors='replace')}")
        return 1
    except OSError as e:
        print(f"{args.worker}: {e}")
        return 1
