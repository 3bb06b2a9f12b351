"""TLS for facepay's gRPC: the gateway's server credentials and the clients' channels.

Cameras, backends and operators send bearer tokens and face images: on anything but loopback
they travel inside TLS. The gateway may also ask cameras for client certificates (mutual TLS),
either optionally or required; a camera that presents one can only speak as the camera named
in its certificate.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from facepay.config import Settings
from facepay.private_files import write_private


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gateway, or None when no certificate is configured."""
    if not (settings.grpc_tls_cert_file or settings.grpc_tls_key_file):
        if settings.grpc_tls_client_ca_file or settings.grpc_tls_require_client_cert:
            raise ValueError(
                "client certificates need server TLS: set FACEPAY_GRPC_TLS_CERT_FILE and FACEPAY_GRPC_TLS_KEY_FILE"
            )
        return None
    if not (settings.grpc_tls_cert_file and settings.grpc_tls_key_file):
        raise ValueError("gRPC TLS needs both FACEPAY_GRPC_TLS_CERT_FILE and FACEPAY_GRPC_TLS_KEY_FILE")
    if settings.grpc_tls_require_client_cert and not settings.grpc_tls_client_ca_file:
        raise ValueError(
            "FACEPAY_GRPC_TLS_REQUIRE_CLIENT_CERT needs FACEPAY_GRPC_TLS_CLIENT_CA_FILE (the CA of the cameras)"
        )
    pair = (_read(settings.grpc_tls_key_file), _read(settings.grpc_tls_cert_file))
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(settings.grpc_tls_client_ca_file),
        require_client_auth=settings.grpc_tls_require_client_cert,
    )


def is_loopback(address: str) -> bool:
    """Whether a `host:port` listen address is reachable from this machine only."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an empty host (every interface): treat as the network


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a TLS gateway: the CA that signed the gateway's certificate and,
    for mutual TLS, the client's own certificate and key."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientTLS | None:
        if not settings.grpc_tls_ca_file:
            return None
        return cls(settings.grpc_tls_ca_file, settings.grpc_tls_client_cert_file, settings.grpc_tls_client_key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def channel(self, target: str, options: list | None = None) -> grpc.Channel:
        return grpc.secure_channel(target, self.credentials(), options=options)


def client_channel(target: str, tls: ClientTLS | None, options: list | None = None) -> grpc.Channel:
    """A channel to the gateway: TLS when `tls` is given, plaintext otherwise (loopback, or a
    mesh that encrypts for you)."""
    return tls.channel(target, options) if tls else grpc.insecure_channel(target, options=options)


def make_local_certificates(
    directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> tuple[Path, Path, Path]:
    """A throw-away CA and a gateway certificate for `hosts` (the demo and the tests run TLS
    too); returns (ca certificate, server certificate, server key), the key written 0600."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facepay local CA")])

    def certificate(subject: x509.Name, key, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    ca = certificate(ca_name, ca_key, ca=True).sign(ca_key, hashes.SHA256())
    server = (
        certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facepay gateway")]), server_key, ca=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "gateway.crt", directory / "gateway.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths[2],
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )
    return paths
