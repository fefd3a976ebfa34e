"""TLS settings of the channel, turned into ``ssl.SSLContext`` objects.

Server: certificate + key; with ``ca`` it also requires and verifies client certificates (mutual
TLS).  Client: verifies the server against ``ca`` (the system store when ``ca`` is None) with host
name checking; with ``cert``/``key`` it presents a client certificate.  TLS 1.2 is the minimum.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"TLSConfig.{what}: file {path!r} does not exist")


@dataclass(frozen=True)
class TLSConfig:
    """Paths of the PEM files for TLS and the name the client checks in the server's certificate.

    ``cert``/``key``: this side's certificate chain and private key (required on the server,
    optional on the client = mutual TLS).  ``ca``: the CA bundle that verifies the peer (on the
    server: makes client certificates mandatory).  ``server_hostname``: the name the client expects
    in the server certificate (default: the host it connects to).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_hostname: str | None = None

    def _check(self) -> None:
        _check_file(self.cert, "cert")
        _check_file(self.key, "key")
        _check_file(self.ca, "ca")
        if self.key is not None and self.cert is None:
            raise ValueError("TLSConfig.key is given without TLSConfig.cert")

    def server_context(self) -> ssl.SSLContext:
        """The server-side context (mutual TLS when ``ca`` is set)."""
        if self.cert is None:
            raise ValueError("TLSConfig.cert (and key) are required on the server")
        self._check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The client-side context: verify the server (``ca`` or system store), present cert if given."""
        self._check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.ca is not None:
            ctx.load_verify_locations(cafile=self.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx
