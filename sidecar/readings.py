"""How applications may read a request path, and which route prefixes those readings fall under.

Application servers do not all read a target's path as it was sent. They decode ``%XX``
(once or twice, with or without ``%2F``), drop ``;params`` (Tomcat, Jetty, Spring), merge
slashes, cut at a decoded ``?`` or ``#``, drop the dots and spaces that end a segment (IIS,
Windows), ignore letter case as Unicode folds it (Express, ASP.NET; Python's ``re.I`` and
Java's ``equalsIgnoreCase`` also read the dotless i, U+0131, as ``i`` and the long s,
U+017F, as ``s``), route a script's ``PATH_INFO`` (``/index.php/admin``: PHP, CGI, ASP.NET,
ColdFusion) and drop a format suffix (``/admin.json``: Rails' ``(.:format)``, Spring's
suffix matching). ``check`` refuses what no reading makes safe; ``PathReader.match_sets``
gives, for a target, every set of route prefixes that some combination of those readings
falls under. Fails closed: ``BadPath``.

The readings are never listed (a crafted target has thousands): one left-to-right walk
follows all of them at once, as a set of states, each the part of a reading that is still
the beginning of some route prefix. A state leaves the set as soon as no route prefix can
start with it, so the walk stops early and its work grows linearly with the target; a target
whose readings stay undecided for many segments is refused rather than followed.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable


class BadPath(ValueError):
    """The request target cannot be matched safely; answered 400."""


#: Segment suffixes that make a segment a script whose following segments are its PATH_INFO,
#: routed by the script itself (see the README: "Routes"). Not every dotted segment (that
#: would refuse /api/v1.2/x wherever a route ends in a dot-free name); not Java's .jsp, .do or
#: .action, which the Servlet specification maps by the last segment's extension only.
SCRIPT_EXTENSIONS = (
    # PHP
    "php",
    "php3",
    "php4",
    "php5",
    "php7",
    "php8",
    "phtml",
    "phar",
    # CGI and FastCGI
    "cgi",
    "fcgi",
    "fcg",
    "pl",
    "py",
    "rb",
    # Classic ASP, ASP.NET handlers and services, ISAPI extensions
    "asp",
    "aspx",
    "asmx",
    "ashx",
    "axd",
    "svc",
    "dll",
    "exe",
    # ColdFusion
    "cfm",
    "cfc",
)

# ---- what no reading makes safe -------------------------------------------------------------

# A "%" that does not start an escape: nginx answers 400, IIS reads "%u002e" as a dot.
_NOT_AN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Overlong UTF-8 (C0 and C1 lead bytes, E0 80-9F, F0 80-8F): never valid, and the way old
# decoders were made to read "%c0%ae" as a dot.
_OVERLONG = re.compile(r"%c[01]|%e0%[89]|%f0%8", re.IGNORECASE)
# What is still an escape after one decoding, for a server that decodes twice: refused when it
# names a dot, a slash, a backslash, a percent sign (a third round), ";", "?", "#" or a control.
_TWICE = re.compile(r"%(?:2e|2f|5c|25|3b|3f|23|[01][0-9a-f]|7f)", re.IGNORECASE)
# A "." or ".." segment (Windows also reads ".. " as ".."), where a segment may also end at a
# ";" (params dropped) or a "?" or "#" (a server that cuts there after decoding). Searched
# in the path decoded as far as it goes, where every reading's segments start.
_DOT_SEGMENT = re.compile(r"/\.\.? *(?=[/;?#]|\Z)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _control(text: str) -> bool:
    # isprintable: a fast "no" for the usual all-ASCII path
    return not text.isprintable() and _CONTROL.search(text) is not None


def check(raw_target: str) -> str:
    """The path of ``raw_target`` (query excluded), or ``BadPath`` (see ``_checked``)."""
    return _checked(raw_target)[0]


def _checked(raw_target: str) -> tuple[str, str]:
    """The path of ``raw_target`` (query excluded) and the path decoded as far as it goes,
    or ``BadPath`` for what no reading makes
    safe: a target that is not an absolute path (absolute-form, asterisk-form), a ``#``, a
    ``%`` that starts no escape, overlong UTF-8, control characters, NUL, backslashes (raw or
    encoded), an escape that still names a dot, a slash or another delimiter after one
    decoding (``%252e``, ``%252f``), and a ``.`` or ``..`` segment in any reading: no
    application can then resolve it differently from us.
    """
    if "#" in raw_target:
        raise BadPath("the request target contains a '#'")
    path = raw_target.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadPath("request target is not an absolute path")
    if "%" in path and _NOT_AN_ESCAPE.search(path):
        raise BadPath("path contains a '%' that is not percent-encoding")
    lowered = path.lower()
    if "\\" in path or "%5c" in lowered or "%00" in lowered or _control(path):
        raise BadPath("path contains a backslash or a control character")
    if "%" in path and _OVERLONG.search(path):
        raise BadPath("path contains overlong UTF-8")
    once = _decode(path, escapes_only=True)
    if "\\" in once or _control(once):
        raise BadPath("path contains a backslash or a control character")
    if "%" in once and _TWICE.search(once):
        raise BadPath("path is percent-encoded twice")
    twice = _decode(once)
    if "/." in twice and _DOT_SEGMENT.search(twice):
        raise BadPath("path contains a '.' or '..' segment")
    return path, twice


# ---- decoding, at C speed -------------------------------------------------------------------

_ESCAPE = re.compile(r"%(?=[0-9A-Fa-f]{2})")
_ENCODED_SLASH = re.compile(r"%2f", re.IGNORECASE)


def _decode(text: str, *, escapes_only: bool = False) -> str:
    """Every ``%XX`` as the byte it names, the bytes read as UTF-8 (errors replaced), as
    applications decode. ``%`` not followed by two hex digits stays. (``urllib``'s
    ``unquote`` does the same in Python, a hundred times slower on an 8 KB target.)"""
    if "%" not in text:
        return text
    # escapes_only: the caller knows that every "%" starts an escape (a raw path that check
    # let through, or a piece of one), which saves a search of the whole text.
    # No backslash is left in a path that reaches here (check refuses them), so "\xNN"
    # sequences are the escapes and nothing else. (A plain replace when every "%" starts an
    # escape, as in every raw path check lets through: three times faster than the sub.)
    if escapes_only or _NOT_AN_ESCAPE.search(text) is None:
        marked = text.replace("%", "\\x")
    else:
        marked = _ESCAPE.sub(r"\\x", text)
    escaped = marked.encode("utf-8", "surrogateescape")
    return codecs.escape_decode(escaped)[0].decode("utf-8", "replace")


def _decode_keeping_slashes(text: str, *, escapes_only: bool = False) -> str:
    """``_decode``, but ``%2F`` stays encoded (most servers do not read it as a separator).
    The controls standing in for it cannot be in a path that reaches here."""
    kept = text.replace("%2f", "\x01").replace("%2F", "\x02")
    return _decode(kept, escapes_only=escapes_only).replace("\x01", "%2f").replace("\x02", "%2F")


def _decodings(segment: str) -> set[str]:
    """A raw segment as sent, decoded once (with and without ``%2F``), and decoded again."""
    if "%" not in segment:
        return {segment}
    once = _decode(segment, escapes_only=True)  # a piece of the raw path check let through
    out = {segment, once}
    if "%" in once:
        out.add(_decode(once))
    if _ENCODED_SLASH.search(segment) is not None:
        kept = _decode_keeping_slashes(segment, escapes_only=True)
        out.add(kept)
        out.add(_decode(kept))
        out.add(_decode_keeping_slashes(kept))
    return out


# ---- scripts --------------------------------------------------------------------------------


def _alternatives(words: Iterable[str], letter: Callable[[str], str]) -> str:
    """The words as one pattern factored by their first characters (a trie), each character
    as ``letter`` writes it: a position that starts no word fails at its first character,
    however long the target (a flat alternation tries every word at every dot)."""
    tails: dict[str, list[str]] = {}
    complete = False
    for word in words:
        if word:
            tails.setdefault(word[0], []).append(word[1:])
        else:
            complete = True
    if not tails:
        return ""
    branches = "|".join(letter(c) + _alternatives(t, letter) for c, t in sorted(tails.items()))
    return f"(?:{branches}){'?' if complete else ''}"


def _raw_letter(char: str) -> str:
    codes = sorted({ord(char.lower()), ord(char.upper())})
    return f"(?:{re.escape(char)}|%(?:25)?(?:{'|'.join(f'{c:02x}' for c in codes)}))"


_EXTENSION = r"\.(?=[a-z])" + _alternatives(SCRIPT_EXTENSIONS, re.escape)
# In a decoded piece: a script's extension, then only what a reading drops (trailing dots and
# spaces; ";params"; a cut at "?" or "#") before the piece ends: a script whose own segment
# may be dropped.
_SCRIPT = re.compile(_EXTENSION + r"(?=[. ]*([;?#]|\Z))", re.IGNORECASE | re.ASCII)
# The same without a cut, in a piece (no slash in it): a script whose PATH_INFO (what
# follows) may be read from the top...
_RESTARTS = re.compile(_EXTENSION + r"(?=[. ]*(?:;|\Z))", re.IGNORECASE | re.ASCII)
# ...in a decoded segment, where a piece also ends at a slash...
_RESTARTS_IN = re.compile(_EXTENSION + r"(?=[. ]*(?:;[^/]*)?(?:/|\Z))", re.IGNORECASE | re.ASCII)
# ...with more path after it, in the path decoded as far as it goes (only then does the
# restart matter once every reading is decided)...
_RESTARTS_THEN = re.compile(_EXTENSION + r"(?=[. ]*([;/]))", re.IGNORECASE | re.ASCII)
# ...and in the raw path, each character literal or percent-encoded once or twice, so that
# the walk does not stop before it.
_RAW_RESTARTS_THEN = re.compile(
    r"(?:\.|%2e)(?=[a-z%])"
    + _alternatives(SCRIPT_EXTENSIONS, _raw_letter)
    + r"(?=(?:[. ]|%2e|%20|%2520)*(;|%3b|/|%2f))",
    re.IGNORECASE | re.ASCII,
)
_SLASH_OR_ENCODED = re.compile(r"/|%2f", re.IGNORECASE)


def _restart_then(pattern: re.Pattern[str], text: str, start: int) -> re.Match[str] | None:
    """The first script in ``text`` from ``start`` (``_RESTARTS_THEN`` or
    ``_RAW_RESTARTS_THEN``) followed by a slash, either at once or after its ``;params``.
    (In one pattern, ``;[^/]*/`` scans to the end of the target from every script with
    params and no slash after them: quadratic, 30 ms on 8 KB of ``x.php;``.) Params end at
    the next slash, so they are followed by one exactly when any slash follows: when none
    does, no later script is followed by one either."""
    found = pattern.search(text, start)
    if found is None or found.group(1) not in (";", "%3b", "%3B"):
        return found
    return found if _SLASH_OR_ENCODED.search(text, found.end(1)) is not None else None


def _script(piece: str) -> tuple[bool, bool]:
    """Whether a decoded piece (no slash in it) is a script (``_SCRIPT``), and whether it
    also restarts the readings (``_RESTARTS``): one search of the piece, and a second only
    from after a script cut by "?" or "#" (an 8 KB piece is searched about once)."""
    found = _SCRIPT.search(piece)
    if found is None:
        return False, False
    if found.group(1) in (";", ""):
        return True, True
    # Every restart is a script at or after the first one, and not that one (cut there).
    return True, _RESTARTS.search(piece, found.end()) is not None


# ---- letter case ----------------------------------------------------------------------------


def _simple(char: str) -> str:
    # Java's Character.toLowerCase(Character.toUpperCase(c)): one character to one ("İ" is
    # "i"); Python's own mappings may give two.
    upper = char.upper()
    lower = (upper if len(upper) == 1 else char).lower()
    return lower if len(lower) == 1 else lower[0]


def _folds(char: str) -> tuple[str, ...]:
    """What a case-insensitive server may compare ``char`` as: ``str.lower`` (Express,
    ASP.NET), ``casefold``, upper case then lower (Python's ``re.I``, JavaScript's ``/iu``:
    U+0131 and U+017F are "i" and "s"), Java's simple one-to-one mappings."""
    if char.isascii():
        return (char.lower(),)
    return tuple(
        dict.fromkeys((char.lower(), char.casefold(), char.upper().lower(), _simple(char)))
    )


def _folded_prefixes(prefix: str) -> tuple[str, ...]:
    return tuple(
        dict.fromkeys(
            (
                prefix.lower(),
                prefix.casefold(),
                prefix.upper().lower(),
                "".join(_simple(c) for c in prefix),
            )
        )
    )


# ---- the walk -------------------------------------------------------------------------------

_EXACT, _FOLDED = 0, 1
_MODES = (_EXACT, _FOLDED)
#: (mode, the reading so far, final): final once a format suffix was dropped, after which
#: nothing but slashes may follow
State = tuple[int, str, bool]
_START: frozenset[State] = frozenset((mode, "", False) for mode in _MODES)
#: a script's PATH_INFO read from the top: nothing read yet (dropped if nothing follows)
_RESTART = _START
#: segments and decoded pieces walked while some reading is still undecided, counted once for
#: each way a segment decodes and over the whole path (scripts restart readings); beyond,
#: refused. A real path's route is decided within a few segments
MAX_OPEN_PIECES = 64
#: remembered outcomes (bounded: the strings are partly the client's)
_MEMO = 4096
#: a path with none of what makes readings differ: as sent, and in lower case
_PLAIN = re.compile(r"[A-Za-z0-9/_~!$&'()*+,=:@-]*")


class PathReader:
    """The route prefixes of a route table, compiled once; ``match_sets`` per request."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self._prefixes = tuple(dict.fromkeys(prefixes))
        #: per mode: prefix -> the strings a reading is compared with
        self._variants: tuple[dict[str, tuple[str, ...]], ...] = (
            {p: (p,) for p in self._prefixes},
            {p: _folded_prefixes(p) for p in self._prefixes},
        )
        #: per mode: every proper beginning of some prefix (a reading there is undecided)
        self._open: tuple[frozenset[str], ...] = tuple(
            frozenset(v[:k] for vs in variants.values() for v in vs for k in range(len(v)))
            for variants in self._variants
        )
        self._settled_memo: dict[tuple[int, str], frozenset[str]] = {}
        self._end_memo: dict[tuple[int, str], frozenset[str]] = {}
        self._fold_memo: dict[str, tuple[str, ...]] = {}

    def match_sets(self, raw_target: str) -> frozenset[frozenset[str]]:
        """For every reading of ``raw_target``, the set of route prefixes it falls under (a
        route ending in ``/`` also covers the same path without it). Raises ``BadPath`` (see
        ``check``), and when the readings stay undecided for too long."""
        path, decoded = _checked(raw_target)
        if not self._prefixes:
            return frozenset({frozenset()})
        if "//" not in path and _PLAIN.fullmatch(path):
            return frozenset({self._end(_EXACT, path), self._end(_FOLDED, path.lower())})
        # A script in any reading is one in the path decoded as far as it goes.
        scripts = "." in decoded and _restart_then(_RESTARTS_THEN, decoded, 0) is not None
        return self._walk(path, scripts)

    # -- outcomes --

    def _settled(self, mode: int, reading: str) -> frozenset[str]:
        """The prefixes a reading falls under once no prefix can start with it."""
        key = (mode, reading)
        found = self._settled_memo.get(key)
        if found is None:
            found = frozenset(
                p
                for p, variants in self._variants[mode].items()
                if any(reading.startswith(v) for v in variants)
            )
            if len(self._settled_memo) >= _MEMO:
                self._settled_memo.clear()
            self._settled_memo[key] = found
        return found

    def _end(self, mode: int, reading: str) -> frozenset[str]:
        """The prefixes a whole reading falls under."""
        key = (mode, reading)
        found = self._end_memo.get(key)
        if found is None:
            found = frozenset(
                p
                for p, variants in self._variants[mode].items()
                if any(
                    reading.startswith(v) or (v.endswith("/") and len(v) > 1 and reading == v[:-1])
                    for v in variants
                )
            )
            if len(reading) <= 256:
                if len(self._end_memo) >= _MEMO:
                    self._end_memo.clear()
                self._end_memo[key] = found
        return found

    def _fold(self, char: str) -> tuple[str, ...]:
        found = self._fold_memo.get(char)
        if found is None:
            found = _folds(char)
            if len(self._fold_memo) >= _MEMO:
                self._fold_memo.clear()
            self._fold_memo[char] = found
        return found

    # -- the walk --

    def _walk(self, path: str, scripts: bool) -> frozenset[frozenset[str]]:
        outcomes: set[frozenset[str]] = set()
        states: set[State] = set(_START)
        opened = 0
        position, size = 1, len(path)
        while True:
            segment_start = position
            if not states:
                # Every reading is decided: only a script with more path after it starts one
                # again, from the end of its piece. What comes before it in its segment can
                # be skipped (no escape spans the dot it starts with).
                found = _restart_then(_RAW_RESTARTS_THEN, path, position) if scripts else None
                if found is None:
                    break
                position = path.rfind("/", 0, found.start()) + 1
                segment_start = found.start()
            end = path.find("/", position)
            if end < 0:
                end = size
            segment = path[segment_start:end]
            following: set[State] = set()
            for variant in _decodings(segment):
                after, walked = self._variant(states, variant, outcomes, MAX_OPEN_PIECES - opened)
                following |= after
                opened += walked
            states = following
            if end >= size:
                break
            position = end + 1
        for mode, reading, _ in states:
            if reading:
                outcomes.add(self._end(mode, reading))
        return frozenset(outcomes)

    def _variant(
        self, states: set[State], variant: str, outcomes: set[frozenset[str]], allowance: int
    ) -> tuple[set[State], int]:
        """A raw segment, read as ``variant``, after ``states``: its pieces between (decoded)
        slashes, each after a slash. Also how many pieces were walked with a reading open:
        more than ``allowance`` is refused (a path of a thousand ``;x/`` or ``%2F`` is not
        walked)."""
        ended: set[State] = set()  # ";params" dropped up to the end of the raw segment
        current = states
        walked = 0
        start, size = 0, len(variant)
        while start <= size:
            if current:
                walked += 1
                if walked > allowance:
                    raise BadPath("path is ambiguous: its route is not settled by its beginning")
            else:
                # Every reading is decided: only a script further on starts one again.
                found = _RESTARTS_IN.search(variant, start) if "." in variant else None
                if found is None:
                    break
                start = variant.rfind("/", 0, found.start()) + 1
            end = variant.find("/", start)
            if end < 0:
                end = size
            piece = variant[start:end]
            script, restart = _script(piece) if "." in piece else (False, False)
            current = self._slash(current, outcomes)
            current = self._piece(current, piece, script, restart, outcomes, ended)
            start = end + 1
        return current | ended, walked

    def _slash(self, states: set[State], outcomes: set[frozenset[str]]) -> set[State]:
        out: set[State] = set()
        for state in states:
            mode, reading, final = state
            if final or reading.endswith("/"):
                out.add(state)  # a dropped suffix is followed by slashes only; merged slashes
                if final:
                    continue
            self._extend(out, mode, reading + "/", outcomes)
        return out

    def _piece(
        self,
        states: set[State],
        piece: str,
        script: bool,
        restart: bool,
        outcomes: set[frozenset[str]],
        segment_ended: set[State],
    ) -> set[State]:
        """``piece`` (no slash in it) after ``states``. Along the way, from the reading as it
        stood: at a ";" the rest of the piece (and of the raw segment) may be dropped, at a
        "?" or "#" the path may end, at a "." the rest may be a dropped format suffix, and a
        final run of dots and spaces may be dropped."""
        current = states
        # readings stopped in this piece: before a ";" (params dropped) or before a format
        # suffix (final); a later ";" or "?" may stop them again, a "?" may end them
        stopped: set[State] = set()
        run: set[State] = set()  # readings as they stood inside a run of dots and spaces
        rest = ""
        for index, char in enumerate(piece):
            if not current:
                rest = piece[index:]
                if run:
                    # Only the end of the run matters now: what follows it, if anything.
                    after = rest.lstrip(". ")
                    if not after:
                        stopped |= run
                    elif after[0] == ";":
                        stopped |= run
                        segment_ended |= run
                    elif after[0] in "?#":
                        self._finish(run, outcomes)
                    run = set()
                break
            if char == ";":
                stopping = current | run
                segment_ended |= stopping | stopped
                stopped |= stopping
            elif char == "?" or char == "#":
                self._finish(current | run | stopped, outcomes)
            if char == ".":
                for mode, reading, final in current:
                    if not final:
                        stopped.add((mode, reading, True))
            if char == "." or char == " ":
                run = run | current
            elif run:
                run = set()
            current = self._char(current, char, outcomes)
        if stopped and rest:
            if ";" in rest:
                segment_ended |= stopped
            if "?" in rest or "#" in rest:
                self._finish(stopped, outcomes)
        out = current | stopped | run
        if script:
            out |= states  # the script's own segment dropped, its folder kept
        if restart:
            out |= _RESTART  # everything up to the script dropped: PATH_INFO from the top
        return out

    def _finish(self, states: Iterable[State], outcomes: set[frozenset[str]]) -> None:
        """The path ends here for these readings (a server that cuts at a decoded "?")."""
        for mode, reading, _ in states:
            if reading:
                outcomes.add(self._end(mode, reading))

    def _char(self, states: set[State], char: str, outcomes: set[frozenset[str]]) -> set[State]:
        out: set[State] = set()
        for mode, reading, final in states:
            if final:
                continue  # a format suffix dropped: no more text may follow
            if mode == _EXACT:
                self._extend(out, mode, reading + char, outcomes)
            else:
                for option in self._fold(char):
                    self._extend(out, mode, reading + option, outcomes)
        return out

    def _extend(
        self, out: set[State], mode: int, reading: str, outcomes: set[frozenset[str]]
    ) -> None:
        if reading in self._open[mode]:
            out.add((mode, reading, False))
        else:
            outcomes.add(self._settled(mode, reading))
