"""How application servers may read a request path: an oracle for the path tests.

Written apart from ``sidecar.policy`` on purpose (the tests must not check the code with
itself): every reading a common server is known to make of a path (raw; percent-decoded, with
or without ``%2F``, once or until nothing changes; ``;params`` dropped before or after
decoding; slashes merged; backslashes read as slashes; dot segments resolved by RFC 3986
§5.2.4; cut at a decoded ``?`` or ``#``; letter case ignored; the dots and spaces that end a
segment dropped), in every order, and the route each reading falls
under by the README's rule (longest prefix; ``/admin/`` also covers ``/admin``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ESCAPE_NOT_SLASH = re.compile(r"%(?!2[fF])([0-9A-Fa-f]{2})")


def decode(path: str) -> str:
    """Every %XX as the byte it names (read as Latin-1: one character per byte)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)


def decode_keeping_slashes(path: str) -> str:
    """As most servers do: %2F stays an encoded slash, not a separator."""
    return _ESCAPE_NOT_SLASH.sub(lambda m: chr(int(m.group(1), 16)), path)


def drop_params(path: str) -> str:
    """Tomcat, Jetty, Spring: ``;anything`` up to the next slash is not part of a segment."""
    out = []
    for segment in path.split("/"):
        out.append(segment.split(";", 1)[0])
    return "/".join(out)


def merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def backslashes_as_slashes(path: str) -> str:
    """IIS, Tomcat on Windows, some Node routers."""
    return path.replace("\\", "/")


def cut_at_query(path: str) -> str:
    """A server that decodes first and looks for the query or fragment afterwards."""
    for mark in ("?", "#"):
        path = path.split(mark, 1)[0]
    return path


def fold_case(path: str) -> str:
    """Express, ASP.NET and IIS match routes without regard to letter case."""
    return path.lower()


def strip_segment_ends(path: str) -> str:
    """Windows (IIS, its file system): the dots and spaces that end a name are dropped (from
    names, so from segments that are decoded: none with an escape left in it)."""
    return "/".join(
        segment if _ESCAPE.search(segment) else segment.rstrip(". ") for segment in path.split("/")
    )


def resolve_dots(path: str) -> str:
    """RFC 3986 §5.2.4 remove_dot_segments, step by step as the RFC writes it."""
    source, out = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = "/" + source[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source == "/..":
            source = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source in (".", ".."):
            source = ""
        else:
            start = 1 if source.startswith("/") else 0
            end = source.find("/", start)
            end = len(source) if end < 0 else end
            out += source[:end]
            source = source[end:]
    return out


READINGS: tuple[Callable[[str], str], ...] = (
    decode,
    decode_keeping_slashes,
    drop_params,
    merge_slashes,
    backslashes_as_slashes,
    cut_at_query,
    fold_case,
    strip_segment_ends,
    resolve_dots,
)


def readings(path: str, *, limit: int = 100_000) -> set[str]:
    """Every string reachable from ``path`` by the readings above, in any order and number
    (a breadth-first closure; ``limit`` only guards against a runaway)."""
    seen = {path}
    frontier = [path]
    while frontier:
        nxt = []
        for current in frontier:
            for read in READINGS:
                out = read(current)
                if out not in seen:
                    seen.add(out)
                    nxt.append(out)
        frontier = nxt
        assert len(seen) < limit, f"too many readings of {path!r}"
    return seen


def route_of(path: str, routes: Iterable[str]) -> str | None:
    """The longest route prefix ``path`` falls under (README: a route ending in / also
    covers the same path without it), or None."""
    best: str | None = None
    for route in routes:
        covered = path.startswith(route) or (
            route.endswith("/") and len(route) > 1 and path == route[:-1]
        )
        if covered and (best is None or len(route) > len(best)):
            best = route
    return best


def path_of(target: str) -> str:
    """The path part of an origin-form request target, as sent."""
    return target.split("?", 1)[0]


def has_dot_segment(target: str) -> bool:
    """A ``.`` or ``..`` segment in any reading short of resolving them."""
    path = path_of(target)
    for reading in readings(path):
        for segment in reading.split("/"):
            if segment in (".", ".."):
                return True
    return False
