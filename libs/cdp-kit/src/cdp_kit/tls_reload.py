"""The gRPC server's certificate, key and client CA, taken up again when their files change.

cert-manager renews a certificate in the Kubernetes Secret a pod mounts before it expires; the kubelet
then swaps the volume's `..data` symlink to a folder holding the new files. `ServerCertificates.fetch` is
the fetcher of `grpc.dynamic_ssl_server_credentials`: gRPC's core calls it, on one of its own threads, at
each new connection's handshake, so it only stats the three files (following symlinks: mtime, inode and
size) and returns None while they are the ones it last looked at. When they changed it reads them, checks
that the key is the certificate's and that the CA parses, and only then hands gRPC the new set; a set
written halfway or a key of another certificate keeps the last good one served, with one WARNING per
change naming the variables. Connections already open keep the certificate of their handshake.

The same files are what the service presents when it calls its peers: `cdp_kit.tls_client` follows them
for outgoing channels with the checks of `CertificateFiles`, which both sides share.
Nothing here logs file contents; a certificate's serial number and expiry are logged when it is taken.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from opentelemetry import metrics

from cdp_kit.telemetry import observe_on

log = logging.getLogger("cdp.service.tls")

# What says a file changed: (mtime_ns, inode, size) of the file a path leads to, or None when it cannot be stat'ed.
Stamp = tuple[tuple[int, int, int] | None, ...]

VARIABLES = ("CDP_TLS_CERT_FILE", "CDP_TLS_KEY_FILE", "CDP_TLS_CLIENT_CA_FILE")


class CertificateSetError(ValueError):
    """The files do not make a set a server can serve (named by variable; never their contents)."""


class _ChangedMeanwhile(Exception):
    """The files changed while they were read and checked: looked at again at the next handshake."""


class CertificateFiles:
    """CDP_TLS_CERT_FILE / _KEY_FILE / _CLIENT_CA_FILE, looked at again when they change: the checks and the
    bookkeeping the server's port (`side` "server") and the outgoing channels ("client") share."""

    side = "server"
    using = "serving"  # what the last good set is kept for, in the warning about a refused one

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None, service_name: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self.service_name = service_name
        self._lock = threading.Lock()  # gRPC may call fetch from more than one core thread
        self._stamp: Stamp = ()  # of the files last looked at (taken, or refused and already warned about)
        self.serial: int | None = None
        self.not_after: datetime.datetime | None = None

    def _first_set(self, what: str) -> list[bytes]:
        """The files' contents to start with; a CertificateSetError when they do not make a set."""
        with self._lock:
            for _attempt in range(3):
                stamp = self._stat()
                try:
                    files, serial, not_after = self._load()
                except _ChangedMeanwhile:
                    continue
                self._take(stamp, serial, not_after, what)
                return files
            raise CertificateSetError("the TLS files kept changing while they were read")

    def _changed_set(self) -> list[bytes] | None:
        """The files' contents when they changed since they were last looked at and make a set (then taken);
        None while they are unchanged, change under the read, or make no set (one WARNING per change)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            try:
                files, serial, not_after = self._load()
            except _ChangedMeanwhile:
                return None
            except CertificateSetError as problem:
                self._stamp = stamp  # warned once for this change; the next change is looked at again
                log.warning(
                    "TLS files changed but %s: still %s the certificate with serial %x",
                    problem,
                    self.using,
                    self.serial or 0,
                )
                return None
            self._take(stamp, serial, not_after, "renewed")
            return files

    def _take(self, stamp: Stamp, serial: int, not_after: datetime.datetime, what: str) -> None:
        self._stamp, self.serial, self.not_after = stamp, serial, not_after
        log.info(
            "TLS %s certificate %s: serial %x, valid until %s",
            self.side,
            what,
            serial,
            not_after.isoformat(),
            extra={"cert_file": str(self.cert_file)},
        )

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _stat(self) -> Stamp:
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume swaps its ..data link
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(stamps)

    def _read(self) -> list[bytes]:
        out = []
        for path, variable in zip(self._paths(), VARIABLES, strict=False):
            try:
                out.append(path.read_bytes())
            except OSError as error:
                raise CertificateSetError(f"{variable} cannot be read ({error.strerror})") from None
        return out

    def _load(self) -> tuple[list[bytes], int, datetime.datetime]:
        """What the files hold now (certificate, key and CA when there is one), with the certificate's serial
        and expiry; checked the way a TLS server loads them (ssl), on the files themselves, and read again
        after the check: a set that changed while it was checked is not taken (the next look takes it)."""
        before = self._read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file, password=b"")  # never a prompt
        except (ssl.SSLError, OSError, ValueError):
            raise CertificateSetError(
                "CDP_TLS_CERT_FILE and CDP_TLS_KEY_FILE are not a certificate and its key"
            ) from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cadata=before[2].decode("ascii"))
            except (ssl.SSLError, ValueError, UnicodeDecodeError):
                raise CertificateSetError("CDP_TLS_CLIENT_CA_FILE holds no CA certificate") from None
        if self._read() != before:
            raise _ChangedMeanwhile
        try:
            serial, not_after = certificate_facts(before[0])
        except ValueError:
            raise CertificateSetError("CDP_TLS_CERT_FILE's certificate cannot be parsed") from None
        return before, serial, not_after

    def instrument(self, meter: metrics.Meter) -> None:
        """`cdp.tls.certificate.not_after`: when the certificate this side presents expires (seconds since the
        epoch), per `service` and `side`."""
        observe_on(
            meter,
            "cdp.tls.certificate.not_after",
            self,
            CertificateFiles._observe_not_after,
            lambda callback: meter.create_observable_gauge(
                "cdp.tls.certificate.not_after",
                callbacks=[callback],
                unit="s",
                description="when the certificate the gRPC port serves (side server) or outgoing calls present "
                "(side client) expires, in seconds since the epoch (a renewal taken moves it on)",
            ),
        )

    def _observe_not_after(self) -> Iterator[metrics.Observation]:
        if self.not_after is not None:
            yield metrics.Observation(self.not_after.timestamp(), {"service": self.service_name, "side": self.side})


class ServerCertificates(CertificateFiles):
    """The certificate set a gRPC server serves, from CDP_TLS_CERT_FILE / _KEY_FILE / _CLIENT_CA_FILE."""

    @property
    def require_client_auth(self) -> bool:
        return self.client_ca_file is not None

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The set to start with; a CertificateSetError stops start-up when the files do not make one."""
        return self._configuration(self._first_set("serving"))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: a new set when the files changed and make one, else None (keep serving
        the last good set). Runs on a gRPC core thread: never raises, never touches asyncio."""
        try:
            files = self._changed_set()
            return None if files is None else self._configuration(files)
        except Exception:  # a gRPC core thread must not see it; the last good set is kept
            log.exception("TLS reload failed: still serving the previous certificate")
            return None

    def _configuration(self, files: list[bytes]) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(files[1], files[0])], root_certificates=files[2] if self.client_ca_file is not None else None
        )


def certificate_facts(pem: bytes) -> tuple[int, datetime.datetime]:
    """The serial number and not-after time of the first certificate of a PEM chain (a ValueError if none)."""
    from cryptography import x509  # here: ~0.05 s of CPU to import, and only a service with TLS reads one

    certificate = x509.load_pem_x509_certificate(pem)  # the first one; a ValueError when there is none
    return certificate.serial_number, certificate.not_valid_after_utc
