"""How application servers may read a request path: an oracle for the path tests.

Written apart from ``sidecar.policy`` and ``sidecar.readings`` on purpose (the tests must
not check the code with itself): every reading a common server is known to make of a path
(raw; percent-decoded byte by byte or as UTF-8, with or without ``%2F``, once or until nothing
changes; ``;params`` dropped before or after decoding; slashes merged; backslashes read as
slashes; dot segments resolved by RFC 3986 §5.2.4; cut at a decoded ``?`` or ``#``; letter
case ignored as ``str.lower``, ``casefold``, upper-then-lower (Python's ``re.I``, JavaScript's
``/iu``) and Java's ``equalsIgnoreCase`` fold it; the dots and spaces that end a segment
dropped; a script's segment dropped, or everything up to it, leaving its ``PATH_INFO``), in
every order; then, as a router's last step, a format suffix dropped (Rails, Spring); and the
route each reading falls under by the README's rule (longest prefix; ``/admin/`` also covers
``/admin``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote

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


def decode_utf8(path: str) -> str:
    """As most frameworks decode: the bytes of every escape read as UTF-8."""
    return unquote(path, errors="replace")


def fold_case(path: str) -> str:
    """Express, ASP.NET and IIS match routes without regard to letter case."""
    return path.lower()


def casefold_case(path: str) -> str:
    """Unicode case folding (``str.casefold``): "ß" is "ss"."""
    return path.casefold()


def upper_lower_case(path: str) -> str:
    """Python's ``re.IGNORECASE`` and JavaScript's ``/iu`` also match a character whose upper
    case matches: the dotless i (U+0131) is "I", then "i"; the long s (U+017F) "S", then "s"."""
    return path.upper().lower()


def _java_fold(char: str) -> str:
    # Character.toLowerCase(Character.toUpperCase(c)), with Java's one-to-one mappings: where
    # Python's full mapping has several characters, Java keeps the character, except that the
    # capital I with a dot (U+0130) lowers to a plain "i".
    upper = char.upper()
    if len(upper) != 1:
        upper = char
    if upper == "\u0130":
        return "i"
    lower = upper.lower()
    return lower if len(lower) == 1 else upper


def java_case(path: str) -> str:
    """Java's ``equalsIgnoreCase`` and ``regionMatches(true, ...)`` (Spring, servlet filters)."""
    return "".join(_java_fold(char) for char in path)


#: a segment ending so is a script, and what follows it is its PATH_INFO (the README's list)
SCRIPTS = frozenset(
    [
        "php",
        "php3",
        "php4",
        "php5",
        "php7",
        "php8",
        "phtml",
        "phar",
        "cgi",
        "fcgi",
        "fcg",
        "pl",
        "py",
        "rb",
        "asp",
        "aspx",
        "asmx",
        "ashx",
        "axd",
        "svc",
        "dll",
        "exe",
        "cfm",
        "cfc",
    ]
)


def _script_at(segments: list[str]) -> int | None:
    for index, segment in enumerate(segments):
        if index and "." in segment and segment.rsplit(".", 1)[1].lower() in SCRIPTS:
            return index
    return None


def script_folder(path: str) -> str:
    """A front controller in a folder (Symfony, Laravel): ``/blog/index.php/admin`` is the
    blog's ``/admin``, ``/blog/admin``; the script alone is the folder's ``/``."""
    segments = path.split("/")
    index = _script_at(segments)
    if index is None:
        return path
    rest = segments[index + 1 :]
    return "/".join(segments[:index] + rest) if rest else "/".join(segments[:index]) + "/"


def script_path_info(path: str) -> str:
    """CGI: the script's ``PATH_INFO`` routed from the top (``/cgi-bin/app.cgi/admin/x`` is
    ``/admin/x`` to an application also served from ``/`` by a rewrite)."""
    segments = path.split("/")
    index = _script_at(segments)
    if index is None or index + 1 >= len(segments):
        return path
    return "/" + "/".join(segments[index + 1 :])


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
    decode_utf8,
    drop_params,
    merge_slashes,
    backslashes_as_slashes,
    cut_at_query,
    fold_case,
    casefold_case,
    upper_lower_case,
    java_case,
    strip_segment_ends,
    resolve_dots,
    script_folder,
    script_path_info,
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


def without_format(path: str) -> set[str]:
    """A router's last step: the last segment (trailing slashes aside) without a format
    suffix, from any of its dots (Rails' ``(.:format)``; Spring's suffix patterns match
    ``/admin.*``)."""
    body = path.rstrip("/")
    folder, _, last = body.rpartition("/")
    return {f"{folder}/{last[:i]}" for i, char in enumerate(last) if char == "."}


def routing_readings(path: str) -> set[str]:
    """Every reading, and each of them as a router that drops a format suffix reads it."""
    found = readings(path)
    return found.union(*(without_format(reading) for reading in found))


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
