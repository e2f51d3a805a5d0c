"""Test certificates: a CA, a server certificate for 127.0.0.1 and ``ultrakv.test``, and a
client certificate, all made with ``cryptography`` (no openssl binary needed)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ultrakv.client.client import TLSConfig


@dataclass
class Pki:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def client_tls(self, with_cert: bool = True) -> TLSConfig:
        if not with_cert:
            return TLSConfig(ca_cert=self.ca_cert)
        return TLSConfig(ca_cert=self.ca_cert, client_cert=self.client_cert,
                         client_key=self.client_key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _issue(subject: str, ca_key, issuer: x509.Name, *, ca: bool = False, sans=(), usage=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca_key or key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    ca, ca_key = _issue("ultrakv test CA", None, _name("ultrakv test CA"), ca=True)
    server, server_key = _issue("ultrakv.test", ca_key, ca.subject, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                sans=(x509.DNSName("ultrakv.test"), x509.DNSName("localhost"),
                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client, client_key = _issue("acme client", ca_key, ca.subject,
                                usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(directory / "ca", ca, None)
    _write(directory / "server", server, server_key)
    _write(directory / "client", client, client_key)
    return Pki(str(directory / "ca.crt"), str(directory / "server.crt"), str(directory / "server.key"),
               str(directory / "client.crt"), str(directory / "client.key"))
