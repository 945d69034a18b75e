"""What ``check-config`` (and start-up) says about revocation: a summary, and the risks a valid
configuration leaves open, each with its key path (a CRL past its nextUpdate, a CA whose
certificates ``require`` refuses because it has no CRL)."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives import hashes

from ..certs import read_certificates
from ..config import TLSConfig
from ..errors import CertificateError
from .crl import ca_key, name_text, newest, signers


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def warnings(tls: TLSConfig, now: float | None = None) -> list[str]:
    """Problems with the revocation settings that are not errors (the configuration loads)."""
    moment = time.time() if now is None else now
    out: list[str] = []
    held = newest(tls.crls()).values()
    for crl in sorted(held, key=lambda c: c.next_update):
        if moment <= crl.next_update:
            continue
        if moment > crl.next_update + tls.crl_grace:
            out.append(
                f"tls.crl: the CRL of {crl.issuer} ({crl.source}) expired at "
                f"{_when(crl.next_update)} and tls.crl_grace ({tls.crl_grace:g} s) has passed: "
                "the certificates it speaks for are refused (503) until a newer one is loaded"
            )
        else:
            out.append(
                f"tls.crl: the CRL of {crl.issuer} ({crl.source}) is past its nextUpdate "
                f"({_when(crl.next_update)}); tls.crl_grace lets it serve until "
                f"{_when(crl.next_update + tls.crl_grace)}"
            )
    if tls.crl and not tls.crl_fetch.enabled and tls.crl_mode[1] == "require":
        out.extend(_missing(tls, {crl.ca for crl in held}))
    if tls.ocsp != "off" and not _has_ca(tls):
        out.append(
            f"tls.ocsp: {tls.ocsp}, and tls.client_ca holds no CA: no certificate is checked "
            "(pinned certificates are trusted as themselves, and a question names the "
            "issuer's key); tls.deny can refuse them"
        )
    return out


def _has_ca(tls: TLSConfig) -> bool:
    try:
        return any(True for path in tls.client_ca for _ in read_certificates(path))
    except CertificateError:
        return True  # unreadable now: the load that follows says so


def _missing(tls: TLSConfig, covered: set[str]) -> list[str]:
    """CAs among the anchors without a CRL whose certificates ``require`` refuses."""
    try:
        anchors = [c for path in tls.client_ca for c in read_certificates(path)]
    except CertificateError:
        return []
    cas = signers(anchors)
    chain = tls.crl_mode[0] == "chain"
    out = []
    for ca in cas:
        if ca_key(ca) in covered:
            continue
        # In leaf mode a CA that signs another anchor (a root above an intermediate) is not
        # asked for a CRL unless it signs client certificates itself, which cannot be known.
        signs_anchor = any(other.issuer == ca.subject and other is not ca for other in cas)
        if not chain and signs_anchor:
            continue
        what = (
            "certificates it issued (client or intermediate)"
            if chain
            else "client certificates it issued"
        )
        out.append(
            f"tls.crl_mode: require, and no CRL in tls.crl for {name_text(ca.subject)} "
            f"(tls.client_ca): {what} are refused (503); add its CRL, or use if_present"
        )
    return out


def summary(tls: TLSConfig, now: float | None = None) -> list[str]:
    """check-config's lines about revocation."""
    moment = time.time() if now is None else now
    parts = []
    if tls.crl or tls.crl_fetch.enabled:
        scope, missing = tls.crl_mode
        held = newest(tls.crls()).values()
        crls = ", ".join(
            f"{crl.issuer} ({len(crl.revoked)} revoked, next update {_when(crl.next_update)}"
            f"{', EXPIRED' if moment > crl.next_update + tls.crl_grace else ''})"
            for crl in sorted(held, key=lambda c: c.issuer)
        )
        fetch = ", + distribution points" if tls.crl_fetch.enabled else ""
        parts.append(
            f"CRL {scope} {missing}, grace {tls.crl_grace:g}s{fetch}: {crls or 'no files'}"
        )
    if tls.ocsp != "off":
        responder = tls.ocsp_responder or "each certificate's own (authorityInfoAccess)"
        parts.append(f"OCSP {tls.ocsp}, responder {responder}, timeout {tls.ocsp_timeout:g}s")
    if tls.deny:
        parts.append(f"deny-list {len(tls.deny)} entr{'y' if len(tls.deny) == 1 else 'ies'}")
    if not parts:
        return ["  revocation  off (no tls.crl, tls.ocsp or tls.deny)"]
    return [f"  revocation  {parts[0]}", *(f"              {p}" for p in parts[1:])]


def anchor_expiries(tls: TLSConfig) -> list[tuple[str, str, float]]:
    """(subject, SHA-256, notAfter) of every trust anchor, for the expiry gauge."""
    out = []
    for path in (*tls.client_ca, *tls.pinned_certificates):
        try:
            certs = read_certificates(path)
        except CertificateError:
            continue
        for cert in certs:
            out.append(
                (
                    name_text(cert.subject),
                    cert.fingerprint(hashes.SHA256()).hex(),
                    cert.not_valid_after_utc.timestamp(),
                )
            )
    return out
