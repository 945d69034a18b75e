"""Search for the request target whose route costs the most CPU to decide (issue #12, second
round, finding 6). Not part of ``pytest``; run it on a quiet machine:

    .venv/bin/python -m tests.benchmarks.path_cost [EXAMPLES] [SEED]
    .venv/bin/python -m tests.benchmarks.path_cost climb [SECONDS] [SEED]

Hypothesis generates a unit (pieces from the property tests' alphabet, the attacker's unit,
and what keeps readings open: ``;``, ``%2F``, scripts, dots, folded letters), a start, and a
route table (the tests' four routes, or fifty with shared prefixes), repeats the unit up to
the request-line limit (8190 bytes), and steers towards the slowest (``hypothesis.target``
on the least CPU time of three matches, without the route cache). It prints the worst
targets found and their cost, and the cost of the attacker's own target for comparison.

``climb`` is a targeted generator instead: from random units of the same alphabet, it
mutates the unit (a piece added, removed or replaced; two units spliced) and keeps a mutant
whenever the repeated target costs more, restarting from a fresh unit when ten mutants in a
row are no slower, until SECONDS have passed.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time

import hypothesis
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from sidecar import BUILD
from sidecar.policy import BadPath, Route, RouteTable

from ..test_path_security import PIECES, STARTS

LIMIT = 8190 - len("GET  HTTP/1.1")
FOUR = [
    Route("/public/", public=True),
    Route("/admin/", roles=frozenset({"administrator"})),
    Route("/api/v1/", roles=frozenset({"api"})),
    Route("/"),
]
FIFTY = [
    Route(f"/{a}/{b}/", roles=frozenset({a}))
    for a in ("app", "api", "adm", "ap")
    for b in range(12)
]
FIFTY += [Route("/public/", public=True), Route("/")]
EXTRA = [
    "%2f;%2fxx.%20//%C3%A9%3b%2FaC3%A9%2f%C3EA9xx.",
    ";a",
    "%2F",
    "%2f%2F",
    "x.php",
    "x.php;",
    ".php/%23",
    ".php%3F",
    "...",
    " ",
    "%20",
    "%2520",
    "%3b",
    "%3F",
    "%23",
    "%C4%B1",
    "%C4%B0",
    "p%68p",
    ".j",
    "public",
    "admin",
    "api",
    "v1",
    "app",
]
UNIT = "%2f;%2fxx.%20//%C3%A9%3b%2FaC3%A9%2f%C3EA9xx."
ATTACKER = ("/" + UNIT * (8000 // len(UNIT)))[:8000]


def cost(table_routes: list[Route], path: str) -> float:
    best = float("inf")
    for _ in range(3):
        table = RouteTable(table_routes)
        started = time.thread_time()
        with contextlib.suppress(BadPath):
            table.match(path)
        best = min(best, time.thread_time() - started)
    return best


worst: list[tuple[float, str, int]] = []


def repeated(start: str, unit: list[str]) -> str:
    text = "".join(unit)
    return (start + text * (LIMIT // max(1, len(text)) + 1))[:LIMIT]


def climb(seconds: float, chosen: int) -> None:
    rng = random.Random(chosen)
    alphabet = PIECES + EXTRA
    starts = [*STARTS[:9], "/index.php/", "/admin", "/api/v1"]
    found: list[tuple[float, str, int]] = []
    deadline = time.monotonic() + seconds
    climbs = 0
    while time.monotonic() < deadline:
        climbs += 1
        start = rng.choice(starts)
        unit = [rng.choice(alphabet) for _ in range(rng.randint(1, 8))]
        routes = rng.choice((FOUR, FIFTY))
        best = cost(routes, repeated(start, unit))
        stale = 0
        while stale < 10 and time.monotonic() < deadline:
            mutant = list(unit)
            move = rng.randrange(4)
            if move == 0 or len(mutant) < 2:
                mutant.insert(rng.randrange(len(mutant) + 1), rng.choice(alphabet))
            elif move == 1:
                del mutant[rng.randrange(len(mutant))]
            elif move == 2:
                mutant[rng.randrange(len(mutant))] = rng.choice(alphabet)
            else:
                cut = rng.randrange(len(mutant))
                mutant = mutant[:cut] + [rng.choice(alphabet) for _ in range(3)] + mutant[cut:]
            spent = cost(routes, repeated(start, mutant))
            if spent > best:
                unit, best, stale = mutant, spent, 0
            else:
                stale += 1
        found.append((best, repeated(start, unit), len(routes)))
        found.sort(reverse=True)
        del found[5:]
    print(f"build: {BUILD.describe()}, climb: {climbs} climbs in {seconds:.0f} s")
    print(f"the attacker's target: {cost(FOUR, ATTACKER) * 1000:.3f} ms")
    for spent, path, routes_count in found:
        print(
            f"{spent * 1000:.3f} ms ({routes_count} routes): {path[:120]!r}... ({len(path)} bytes)"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "climb":
        climb(
            float(sys.argv[2]) if len(sys.argv) > 2 else 60.0,
            int(sys.argv[3]) if len(sys.argv) > 3 else 0,
        )
        return
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    chosen = int(sys.argv[2]) if len(sys.argv) > 2 else 0

    @hypothesis.seed(chosen)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        start=st.sampled_from([*STARTS[:9], "/index.php/", "/admin", "/api/v1"]),
        unit=st.lists(st.sampled_from(PIECES + EXTRA), min_size=1, max_size=12),
        fifty=st.booleans(),
    )
    def search(start: str, unit: list[str], fifty: bool) -> None:
        text = "".join(unit)
        path = (start + text * (LIMIT // max(1, len(text)) + 1))[:LIMIT]
        spent = cost(FIFTY if fifty else FOUR, path)
        target(spent * 1000, label="ms of CPU")
        worst.append((spent, path, 50 if fifty else 4))
        worst.sort(reverse=True)
        del worst[5:]

    search()
    print(f"build: {BUILD.describe()}, {examples} examples")
    print(f"the attacker's target: {cost(FOUR, ATTACKER) * 1000:.3f} ms")
    for spent, path, routes in worst:
        print(f"{spent * 1000:.3f} ms ({routes} routes): {path[:120]!r}... ({len(path)} bytes)")


if __name__ == "__main__":
    main()
