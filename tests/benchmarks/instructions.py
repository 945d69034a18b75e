"""Instructions per request on the hot path, counted by Valgrind: a measure no other load moves.

    .venv/bin/python -m tests.benchmarks.instructions [--requests 2000] [--top 40]
        [--match REGEX] [-- hotpath options, e.g. --log json]

On a shared machine ``hotpath.py``'s microseconds move by a third between a slow and a fast
period, and ``run.sh`` only tells effects of 10 % or more apart. The instructions a request
executes do not move: this runs ``hotpath.py`` twice under ``valgrind --tool=callgrind``, with
N and 2N requests per round, and divides the difference by the extra requests, so start-up,
the warm-up and the harness's fixed costs cancel out. It prints the instructions per request
and the functions that execute the most of them per request, inclusive of what they call
(the sidecar's compiled ones by default, named ``module.Class.method``; ``--match`` for C
functions, which keep their names). Each run takes about a minute (Valgrind is about 50
times slower); both run at once.

Instructions are not time (a cache miss costs more than an add), but on the request path,
where the working set is small, fewer instructions is less CPU, and a change of 1 % shows.
Needs ``valgrind`` (Debian: ``apt-get install valgrind``, which brings ``callgrind_annotate``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: a function's line in ``callgrind_annotate --inclusive=yes``: its count, then file:function
_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*(?:\[[^\]]*\])?$")
#: the sidecar's compiled functions, as ``_function`` names them
_SIDECAR = r"^[a-z_0-9]+\.[A-Za-z_]"
_TOTAL = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?PROGRAM TOTALS")


def _count(value: str) -> int:
    return int(value.replace(",", ""))


def _function(name: str) -> str:
    """``/path/file.c:function`` as ``function`` (callgrind also lists a function under each
    header its inlined code came from; the largest of those counts is kept).
    A compiled function of the sidecar, ``CPyDef_client___ClientConnection____start``, is
    shown as ``client.ClientConnection._start`` (mypyc joins the parts with ``___``)."""
    function = name.rpartition(":")[2]
    if function.startswith("CPyDef_"):
        function = ".".join(function.removeprefix("CPyDef_").split("___"))
    return function


def _run(
    requests: int, rounds: int, folder: Path, hotpath_args: list[str]
) -> tuple[Path, subprocess.Popen[bytes]]:
    """Start ``hotpath.py`` under callgrind (a fixed hash seed: dictionaries probe alike)."""
    out = folder / f"callgrind.{requests}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "tests.benchmarks.hotpath",
        "--requests",
        str(requests),
        "--rounds",
        str(rounds),
        *hotpath_args,
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _annotate(path: Path) -> tuple[int, dict[str, int]]:
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = 0
    functions: dict[str, int] = {}
    for line in text.splitlines():
        if (found := _TOTAL.match(line)) is not None:
            total = _count(found.group(1))
        elif (found := _LINE.match(line)) is not None and ":" in found.group(2):
            name = found.group(2)
            # "=>" lines are calls; a name with "'2" is a function's recursive calls, which
            # its outer call's count already holds
            if not name.startswith("=>") and "'" not in name:
                function = _function(name)
                functions[function] = max(functions.get(function, 0), _count(found.group(1)))
    return total, functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="N (the other run: 2N)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    parser.add_argument(
        "--match",
        default=_SIDECAR,
        help="list the functions whose name this regex finds (default: the sidecar's compiled"
        " functions; '.' for every function)",
    )
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    parser.add_argument("hotpath", nargs="*", help="options for hotpath.py (after --)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        print("valgrind is needed: apt-get install valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        low, high = args.requests, 2 * args.requests
        runs = [_run(n, args.rounds, folder, args.hotpath) for n in (low, high)]
        for _, process in runs:
            output, _ = process.communicate()
            if process.returncode != 0:
                print(output.decode(errors="replace"), file=sys.stderr)
                return 1
        (low_total, low_functions), (high_total, high_functions) = (
            _annotate(path) for path, _ in runs
        )
    extra = (high - low) * args.rounds
    print(
        f"{(high_total - low_total) / extra:,.0f} instructions per request"
        f" ({extra:,} requests between a run of {args.rounds} x {low} and one of"
        f" {args.rounds} x {high}; hotpath.py {' '.join(args.hotpath) or 'defaults'})"
    )
    match = re.compile(args.match)
    per_request = {
        name: (high_functions.get(name, 0) - low_functions.get(name, 0)) / extra
        for name in high_functions.keys() | low_functions.keys()
    }
    listed = 0
    for name, count in sorted(per_request.items(), key=lambda item: -item[1]):
        if count < 1 or not match.search(name):
            continue
        print(f"{count:10,.0f}  {name}")
        listed += 1
        if listed >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
