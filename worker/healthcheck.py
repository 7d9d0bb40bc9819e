"""``python -m worker.healthcheck``: exit 0 when a Celery worker on this host answers a ping.

The worker container's healthcheck in ``docker-compose.yml``. A worker's node name is
``dreamdata-<pid>@<host name>`` (``worker.serve.run_worker``) and a container's host name is its own, so each
replica of a scaled worker service checks its own worker, not any worker on the broker. Torch-free: it
imports the Celery app only.
"""
from __future__ import annotations

import argparse
import socket
import sys

from .celery_app import celery_for, worker_names
from .settings import get_settings


def workers_on(replies: list[dict] | None, host: str) -> list[str]:
    """The node names in ping ``replies`` (``[{name: {"ok": "pong"}}, ...]``) of workers on ``host``."""
    return [name for name in worker_names(replies) if name.rpartition("@")[2] == host]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=socket.gethostname(), help="the host name in the worker's node name "
                                                                "(default: this machine's)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for answers (default 3)")
    args = p.parse_args(argv)
    try:
        replies = celery_for(get_settings()).control.ping(timeout=args.timeout)
    except Exception as e:  # the broker is unreachable: unhealthy, with the reason
        print(f"unhealthy: could not ping the workers ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    names = workers_on(replies, args.host)
    if not names:
        print(f"unhealthy: no worker on {args.host} answered a ping within {args.timeout:g} s", file=sys.stderr)
        return 1
    print("healthy:", ", ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
