"""TLS contexts for DICOM TLS (PS3.15 B.9, BCP 195), and their check at load.

BCP 195 (RFC 9325) asks for TLS 1.2 or later with forward-secret AEAD cipher suites only; the contexts below
allow exactly that and nothing older, on both sides of the node.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterator

from cryptography import x509

from scp.config import Config, DicomDestination, TlsConfig
from scp.errors import ConfigError

# TLS 1.2 suites of RFC 9325 4.2 (ECDHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are all AEAD.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
    )
)


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context of our TLS listener; asks for (and with `require_client_cert`, insists on) a peer certificate."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load(context, tls)
    if tls.ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context for associations to a destination: its certificate must chain to `ca` (or the system's CAs);
    ours is presented when the archive asks. Host names are not checked: DICOM peers are known by address and
    AE title, and their certificates rarely name them (PS3.15 B.9 leaves identity checking to the site)."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    _load(context, tls)
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca is None:
        context.load_default_certs()
    return context


EXPIRY_WARNING_DAYS = 30
"""A certificate that expires within this many days is warned about."""


def _places(loaded: Config) -> Iterator[tuple[str, TlsConfig, Callable[[TlsConfig], ssl.SSLContext]]]:
    """Every TLS setting of `loaded`: where it is, and the context it makes."""
    if loaded.node.tls is not None:
        yield "node.tls", loaded.node.tls, server_context
    for name, destination in loaded.destinations.items():
        if isinstance(destination, DicomDestination) and destination.tls is not None:
            yield f"destinations.{name}.tls", destination.tls, client_context


def check_tls(loaded: Config, source: str) -> None:
    """Build every TLS context `loaded` names, as `run` will: a certificate that does not match its key, or a file
    that is not PEM, is a ConfigError naming the key path (check-config said OK, then `run` failed)."""
    problems = []
    for where, tls, make in _places(loaded):
        try:
            make(tls)
        except ConfigError as exc:
            problems.append(f"  {where}: {str(exc).removeprefix('tls: ')}")
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems))


def certificates(loaded: Config) -> Iterator[tuple[str, x509.Certificate]]:
    """Every certificate in the `cert` and `ca` files `loaded` names, with where it is configured (a file that
    cannot be read is check_tls's to report)."""
    for where, tls, _ in _places(loaded):
        for key, path in (("cert", tls.cert), ("ca", tls.ca)):
            if path is None:
                continue
            try:
                found = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError):
                continue
            for certificate in found:
                yield f"{where}.{key}", certificate


def certificate_warnings(loaded: Config, now: datetime.datetime | None = None) -> list[str]:
    """Warnings for certificates that are expired, not valid yet, or expire within EXPIRY_WARNING_DAYS: peers
    refuse the TLS handshake with an invalid one, and every association over it fails."""
    now = now or datetime.datetime.now(datetime.UTC)
    found = []
    for where, certificate in certificates(loaded):
        subject, after = certificate.subject.rfc4514_string(), certificate.not_valid_after_utc
        if after <= now:
            found.append(f"{where}: certificate '{subject}' expired on {after:%Y-%m-%d %H:%M} UTC")
        elif certificate.not_valid_before_utc > now:
            before = certificate.not_valid_before_utc
            found.append(f"{where}: certificate '{subject}' is not valid before {before:%Y-%m-%d %H:%M} UTC")
        elif after - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            days = (after - now).days
            found.append(f"{where}: certificate '{subject}' expires on {after:%Y-%m-%d %H:%M} UTC, in {days} days")
    return found


def _load(context: ssl.SSLContext, tls: TlsConfig) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            context.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate {tls.cert}, key {tls.key} or ca {tls.ca}: {exc}") from exc
