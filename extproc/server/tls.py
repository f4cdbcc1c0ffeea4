"""TLS for the ext_proc server (`epp serve --secure-serving`), as the reference picker does it:
the certificate and key from `--cert-path DIR` (`tls.crt`, `tls.key`, the layout of a Kubernetes TLS
Secret), or a self-signed certificate generated at start when no directory is given.

Key material is only ever handed to gRPC; nothing here logs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from pickers.framework.errors import ConfigError

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    cert_pem: bytes
    key_pem: bytes = b""  # never printed: repr shows only the certificate's source
    source: str = ""

    def __repr__(self) -> str:
        return f"ServingCertificate(source={self.source!r})"


def load_certificate(cert_dir: str | Path) -> ServingCertificate:
    """`tls.crt` and `tls.key` from `cert_dir`; ConfigError naming the file when one is unusable."""
    d = Path(cert_dir)
    parts: dict[str, bytes] = {}
    for name in (CERT_FILE, KEY_FILE):
        path = d / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror or e}", field="--cert-path") from None
        if b"-----BEGIN " not in data:
            raise ConfigError(f"{path}: expected a PEM file", field="--cert-path")
        parts[name] = data
    return ServingCertificate(parts[CERT_FILE], parts[KEY_FILE], source=str(d))


def self_signed(hosts: tuple[str, ...] = (), days: int = 365) -> ServingCertificate:
    """A fresh ECDSA P-256 key and a self-signed certificate for localhost, this host's name and
    `hosts` (names or IP addresses), valid from a minute ago for `days` days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts):
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-epp"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-epp self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ServingCertificate(cert.public_bytes(serialization.Encoding.PEM), key_pem, source="self-signed")


def write_certificate(cert: ServingCertificate, cert_dir: str | Path) -> Path:
    """Write `tls.crt` and `tls.key` (mode 0600) into `cert_dir`, e.g. for tests and `epp up --secure`."""
    d = Path(cert_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / CERT_FILE).write_bytes(cert.cert_pem)
    key_path = d / KEY_FILE
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(cert.key_pem)
    return d
