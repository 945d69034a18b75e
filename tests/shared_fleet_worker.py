"""One process of a large fleet, without TLS in front: ``build_cache`` for the http backend
and the shared cache, exactly as ``sidecar run`` builds it, then ``--count`` lookups of
distinct certificates all at once, at ``--start-at`` (a wall-clock time every process of the
fleet was given). Prints its shared cache's counters as JSON.

    python -m tests.shared_fleet_worker --redis URL --verdicts URL --count 1000 --start-at T

``test_shared_fleet.py`` runs twenty of these: the fleet-wide single-flight at the scale of
the issue's target, without paying for twenty thousand TLS handshakes on a 2-CPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from sidecar.app import build_cache
from sidecar.certs import ClientCert
from sidecar.config import IdentityConfig
from sidecar.identity import LookupContext, Verdict
from sidecar.identity.shared.store import SharedCache

from .pki import make_ca, make_leaf


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = IdentityConfig.model_validate(
        {
            "backend": "http",
            "http": {"url": args.verdicts, "timeout": "5s"},
            "cache": {"shared": {"url": args.redis, "timeout": args.timeout}},
        },
        context={"base_dir": Path.cwd()},
    )
    cache = build_cache(config)
    await cache.start()
    base = ClientCert.from_x509(make_leaf(make_ca(), "fleet").cert)
    certs = [
        dataclasses.replace(base, sha256=hashlib.sha256(b"cert-%d" % n).hexdigest(), serial=n)
        for n in range(args.count)
    ]
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    started = time.monotonic()
    try:
        answers = await asyncio.gather(
            *(cache.lookup(c, LookupContext()) for c in certs), return_exceptions=True
        )
    finally:
        took = time.monotonic() - started
        await cache.close()
    shared = cache.shared
    assert isinstance(shared, SharedCache)
    stats = shared.stats
    result = {
        "allowed": sum(1 for v in answers if isinstance(v, Verdict) and v.kind == "allow"),
        "failed": sum(1 for v in answers if isinstance(v, BaseException)),
        "seconds": round(took, 3),
        "up": stats.up,
        "hits": stats.hits,
        "misses": stats.misses,
        "skipped": stats.skipped,
        "errors": stats.errors,
        "lock_waits": stats.lock_waits,
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--verdicts", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--timeout", default="50ms", help="identity.cache.shared.timeout")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
