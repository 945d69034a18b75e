"""``identity/legacy.py`` without sockets: the parameter taken out of a target, our cookies
taken out of a request, references spent once with a fake clock and a fake resolver, and
``check-config`` naming every HTTP-legacy problem with its key path."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.__main__ import main as sidecar_main
from sidecar.certs import ClientCert
from sidecar.identity import User, Verdict
from sidecar.identity.legacy import (
    INTENT_COOKIE,
    Legacy,
    cookie_headers,
    reference,
    without_cookies,
)
from sidecar.sessions import COOKIE_NAME

from .conftest import ConfigDir

KEY = os.urandom(32)
HOST = "shop.example"


# ---- the parameter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a", None),
        ("/a?x=1", None),
        ("/a?identity-plus-intent=R", ("R", "/a")),
        ("/a?x=1&identity-plus-intent=R&y=2", ("R", "/a?x=1&y=2")),
        ("/a?identity%2Dplus%2Dintent=R", ("R", "/a")),
        ("/a?IDENTITY-PLUS-INTENT=R", ("R", "/a")),
        ("/a?identity-plus-intent=", (None, "/a")),
        ("/a?identity-plus-intent=R&identity-plus-intent=R", (None, "/a")),
        ("/a?identity-plus-intent=a%2Fb", ("a/b", "/a")),
        ("/a?identity-plus-intentx=R", None),
        ("/a?x=1?identity-plus-intent=R", ("R", "/a?x=1")),
        ("/a?identity-plus-intent=R?x=1&y=2", ("R", "/a?x=1&y=2")),
        ("/a?q=what?&y=2", None),
        ("/a?q=what?&identity-plus-intent=R", ("R", "/a?q=what?")),
        ("/a?&identity-plus-intent=R", ("R", "/a")),
    ],
)
def test_reference(target: str, expected: tuple[str | None, str] | None) -> None:
    assert reference(target) == expected


_PAIR = st.tuples(
    st.sampled_from(["x", "a", "identity-plus-intent", "identity%2Dplus-intent", "intent", "%41"]),
    st.text(alphabet="abcXYZ019%-_=", max_size=8),
)


@given(path=st.sampled_from(["/", "/app/page", "/%69dentity"]), pairs=st.lists(_PAIR, max_size=6))
def test_the_parameter_never_survives(path: str, pairs: list[tuple[str, str]]) -> None:
    query = "&".join(f"{n}={v}" for n, v in pairs)
    target = f"{path}?{query}" if pairs else path
    found = reference(target)
    clean = target if found is None else found[1]
    for piece in clean.partition("?")[2].split("&"):
        name = piece.partition("=")[0]
        assert name.lower().replace("%2d", "-") != "identity-plus-intent", (target, clean)
    if found is not None:
        assert clean.startswith(path)


# ---- our cookies --------------------------------------------------------------------------


def test_our_cookies_are_taken_out_and_the_others_kept() -> None:
    raw = [
        (b"Host", b"shop.example"),
        (b"Cookie", f"a=1; {COOKIE_NAME}=v; b=2".encode()),
        (b"cookie", f"{INTENT_COOKIE}=w".encode()),
        (b"Cookie", b"theme=dark"),
        (b"Cookie", b"__host-sidecar-identity=not-ours"),
    ]
    assert cookie_headers(raw) == [f"a=1; {COOKIE_NAME}=v; b=2", f"{INTENT_COOKIE}=w"]
    assert without_cookies(raw) == [
        (b"Host", b"shop.example"),
        (b"Cookie", b"a=1; b=2"),
        (b"Cookie", b"theme=dark"),
        (b"Cookie", b"__host-sidecar-identity=not-ours"),
    ]


# ---- spending references ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Resolver:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve_intent(self, reference: str) -> tuple[int, Verdict] | None:
        self.asked.append(reference)
        cert = ClientCert.known_by_serial(77)
        return 77, Verdict.allow(User(sub="s", username=str(cert.serial)))


def intent_value(legacy: Legacy, ref: str) -> str:
    line = legacy.intent_cookie(f"https://signon.example/{quote(ref, safe='')}", host=HOST)
    return line.split(";", 1)[0]


async def test_a_reference_is_spent_once_and_remembered_only_while_it_could_be_used() -> None:
    clock, resolver = Clock(), Resolver()
    legacy = Legacy(resolver, [KEY], lifetime=300, clock=clock, max_remembered=2)
    cookies = [intent_value(legacy, "r1")]
    first = await legacy.resolve("r1", cookies, host=HOST)
    assert first.outcome == "resolved" and first.cookie is not None
    assert (await legacy.resolve("r1", cookies, host=HOST)).outcome == "replayed"
    assert resolver.asked == ["r1"]
    # another host's intent cookie is forged there
    assert (await legacy.resolve("r1", cookies, host="other.example")).outcome == "forged"
    # full: refused rather than forgetting one that could still be replayed
    assert (await legacy.resolve("r2", [intent_value(legacy, "r2")], host=HOST)).outcome == (
        "resolved"
    )
    assert (await legacy.resolve("r3", [intent_value(legacy, "r3")], host=HOST)).outcome == (
        "replayed"
    )
    clock.now += 200  # every intent cookie from before is long expired: they are forgotten
    assert (await legacy.resolve("r3", [intent_value(legacy, "r3")], host=HOST)).outcome == (
        "resolved"
    )
    stale = [intent_value(legacy, "r4")]
    clock.now += 31
    assert (await legacy.resolve("r4", stale, host=HOST)).outcome == "expired"
    assert resolver.asked == ["r1", "r2", "r3"]


async def test_the_session_stands_for_its_serial_on_its_host_only() -> None:
    clock = Clock()
    legacy = Legacy(Resolver(), [KEY], lifetime=300, clock=clock)
    resolved = await legacy.resolve("r", [intent_value(legacy, "r")], host=HOST)
    assert resolved.cookie is not None
    value = resolved.cookie.split(";", 1)[0].partition("=")[2]
    sent = [f"{COOKIE_NAME}={value}"]
    outcome, cert = legacy.session(sent, host=HOST)
    assert outcome == "valid" and cert is not None and cert.serial == 77
    assert not cert.seen and cert.b64 == "" and cert.sha256 != ClientCert.known_by_serial(78).sha256
    assert legacy.session(sent, host="other.example") == ("invalid", None)
    # an intent cookie is not a session
    assert legacy.session([f"{COOKIE_NAME}={intent_value(legacy, 'x')}"], host=HOST)[1] is None
    clock.now += 300
    assert legacy.session(sent, host=HOST) == ("expired", None)


# ---- check-config -------------------------------------------------------------------------


def test_check_config_names_every_problem_with_its_path(
    config_dir: ConfigDir, capsys: pytest.CaptureFixture[str]
) -> None:
    key = config_dir.path / "session.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    (config_dir.path / "weak.key").write_text("correct horse battery staple 123")
    data = config_dir.base()
    data["identity"]["cache"] = {"ttl": 0}
    data["identity"]["identityplus"] = {
        "certificate": "alice.pem",
        "key": "alice.key",
        "legacy": True,
        "session_keys": ["session.key", "weak.key", "missing.key", "session.key"],
    }
    path: Path = config_dir.write(data)
    assert sidecar_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in (
        "identity.identityplus.session_keys[1]:",
        "not a session key",
        "identity.identityplus.session_keys[2]: file not found",
    ):
        assert expected in err, err
    # the rules across keys, once the files are right
    data["identity"]["identityplus"]["session_keys"] = ["session.key", "session.key"]
    config_dir.write(data)
    assert sidecar_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "identity.identityplus.session_keys[1]: the same key as session_keys[0]" in err
    data["identity"]["identityplus"]["session_keys"] = ["session.key"]
    config_dir.write(data)
    assert sidecar_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "identity.identityplus.legacy: needs identity.backend: identityplus" in err
    data["identity"]["backend"] = "identityplus"
    config_dir.write(data)
    assert sidecar_main(["check-config", str(path)]) == 2
    assert "identity.cache.ttl: must be above 0 with identityplus.legacy" in capsys.readouterr().err
    # and when it is right, the summary says what it will do
    data["identity"]["cache"] = {"ttl": "5m"}
    config_dir.write(data)
    assert sidecar_main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "HTTP legacy: browsers without a certificate sign on" in out
    assert "sessions last 300s, 1 session key(s)" in out


def test_with_legacy_a_server_that_asks_for_no_certificate_may_have_authenticated_routes(
    config_dir: ConfigDir,
) -> None:
    from sidecar import config as config_mod

    (config_dir.path / "session.key").write_text(base64.b64encode(os.urandom(32)).decode())
    data = config_dir.base()
    data["tls"]["client_certificate"] = "none"
    data["routes"] = [{"path": "/public/", "access": "public"}, {"path": "/"}]
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {"certificate": "alice.pem", "key": "alice.key"},
    }
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data, base_dir=config_dir.path, env={})
    assert info.value.problems == [
        "routes[1].access: the server asks for no client certificate (client_certificate: "
        "none): its routes are public"
    ]
    data["identity"]["identityplus"].update(legacy=True, session_keys=["session.key"])
    config_mod.parse(data, base_dir=config_dir.path, env={})
    # a route the certificate itself decides still cannot be reached without one
    data["routes"].append(
        {"path": "/svc/", "access": "certificate", "allow": {"san_dns": ["*.svc.example"]}}
    )
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(data, base_dir=config_dir.path, env={})
    assert [p.partition(":")[0] for p in info.value.problems] == ["routes[2].access"]
