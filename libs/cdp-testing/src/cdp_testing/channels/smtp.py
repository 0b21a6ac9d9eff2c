"""A local SMTP server (aiosmtpd, RFC 5321) with a mailbox tests can read.

    async with LocalSmtpServer() as smtp:            # 127.0.0.1, a free port
        ...send to smtp.host:smtp.port...
        (mail,) = smtp.mailbox
        mail.message["Message-ID"], mail.rcpt_tos

It answers like a real relay: ``550 5.1.1`` for addresses in `unknown`, ``452 4.2.2`` (mailbox full,
temporary) for those in `full`, ``451 4.3.0`` for the next `fail_next_data` messages, AUTH when
`credentials` is set (``535 5.7.8`` on a wrong password, ``530 5.7.0`` when a sender skips AUTH), STARTTLS
when a `tls_context` is given (and required before AUTH), or TLS from the first byte with `implicit_tls`
(port 465 style). With `maildir` or `mbox` every accepted message is
also written there, which is how `make up` shows the mail a journey sent. `bounce(mail)` builds the RFC
3464 delivery status notification a relay would send back for it.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import ssl
import warnings
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# Counts and replies only: addresses and contents are customer data (cdp_testing.channels.logs).
log = logging.getLogger("cdp_testing.channels.smtp")


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage = field(repr=False)
    authenticated_as: str | None = None
    tls: bool = False


class _Handler:
    def __init__(self, server: LocalSmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.server.unknown:
            log.info("refused a recipient", extra={"reply": 550})
            return "550 5.1.1 Recipient address rejected: user unknown"
        if address.lower() in self.server.full:
            log.info("refused a recipient", extra={"reply": 452})
            return "452 4.2.2 Mailbox full, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        if self.server.fail_next_data > 0:
            self.server.fail_next_data -= 1
            log.info("refused a message", extra={"reply": 451})
            return "451 4.3.0 Temporary local problem, try again"
        raw = envelope.original_content or b""
        message = message_from_bytes(raw, policy=policy.default)
        login = session.auth_data if isinstance(session.auth_data, str) else None
        mail = Mail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            message=message,  # type: ignore[arg-type]
            authenticated_as=login,
            tls=session.ssl is not None or smtp.transport.get_extra_info("ssl_object") is not None,
        )
        self.server.deliver(mail)
        log.info("accepted a message", extra={"recipients": len(mail.rcpt_tos), "bytes": len(raw)})
        return "250 2.0.0 Message accepted"


class LocalSmtpServer:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: tuple[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        maildir: Path | None = None,
        mbox: Path | None = None,
        hostname: str = "mx.local.test",
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.hostname = hostname
        self.mailbox: list[Mail] = []
        self.unknown: set[str] = set()
        self.full: set[str] = set()
        self.fail_next_data = 0
        self._maildir = mailbox.Maildir(maildir, create=True) if maildir else None
        self._mbox = mailbox.mbox(mbox, create=True) if mbox else None
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()

    def deliver(self, mail: Mail) -> None:
        self.mailbox.append(mail)
        if self._maildir is not None:
            self._maildir.add(mail.raw)
        if self._mbox is not None:
            self._mbox.add(mail.raw)
            self._mbox.flush()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Mail]:
        """The mailbox once it holds at least `count` messages."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.mailbox) >= count)
        return self.mailbox

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.credentials is not None:
            login, password = auth_data.login.decode(), auth_data.password.decode()
            if (login, password) == self.credentials:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    def _protocol(self) -> SMTP:
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without STARTTLS, which is what implicit TLS (and a plain local
            # test server) is: the warning is about production servers.
            warnings.simplefilter("ignore", UserWarning)
            return self._make_protocol()

    def _make_protocol(self) -> SMTP:
        return SMTP(
            _Handler(self),
            hostname=self.hostname,
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.tls_context is not None and not self.implicit_tls,
            authenticator=self._authenticate if self.credentials else None,
            auth_required=self.credentials is not None,
            # With implicit TLS the whole session is encrypted, but aiosmtpd only knows STARTTLS sessions.
            auth_require_tls=self.tls_context is not None and not self.implicit_tls,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> LocalSmtpServer:
        loop = asyncio.get_running_loop()
        ssl_context = self.tls_context if self.implicit_tls else None
        self._server = await loop.create_server(self._protocol, self.host, self.port, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._mbox is not None:
            self._mbox.close()

    async def __aenter__(self) -> LocalSmtpServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def bounce(self, mail: Mail, *, status: str = "5.1.1", diagnostic: str = "smtp; 550 5.1.1 user unknown") -> bytes:
        """An RFC 3464 non-delivery report for `mail`, as the relay would mail it back to the sender."""
        report = MIMEMultipart("report", report_type="delivery-status")
        report["From"] = f"Mail Delivery System <MAILER-DAEMON@{self.hostname}>"
        report["To"] = mail.mail_from
        report["Subject"] = "Undelivered Mail Returned to Sender"
        report["Date"] = formatdate(usegmt=True)
        report["Message-ID"] = make_msgid(domain=self.hostname)
        report.attach(MIMEText("Your message could not be delivered to one or more recipients.\n"))
        # message/delivery-status: one header block for the message, then one per recipient.
        per_message = Message()
        per_message["Reporting-MTA"] = f"dns; {self.hostname}"
        blocks = [per_message]
        for rcpt in mail.rcpt_tos:
            block = Message()
            block["Final-Recipient"] = f"rfc822; {rcpt}"
            block["Action"] = "failed" if status.startswith("5") else "delayed"
            block["Status"] = status
            block["Diagnostic-Code"] = diagnostic
            blocks.append(block)
        delivery_status = MIMEBase("message", "delivery-status")
        delivery_status.set_payload(blocks)
        report.attach(delivery_status)
        header_block = mail.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        report.attach(MIMEText(header_block.decode("utf-8", "replace"), "rfc822-headers"))
        return report.as_bytes()
