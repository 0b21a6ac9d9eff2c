"""Email over SMTP (RFC 5321) with the standard library's smtplib, one connection per message, in a thread.

The action id becomes the Message-ID (``<action-id@CDP_SMTP_MESSAGE_ID_DOMAIN>``) and an
``X-CDP-Action-Id`` header, so a redelivered action carries the same id (receiving systems and the local
mailbox can tell duplicates apart) and a bounce (see `outcomes.outcome_from_bounce`) leads back to the
action. ``data.unsubscribe_url`` becomes List-Unsubscribe with RFC 8058 one-click. STARTTLS or implicit TLS and AUTH are used as configured; with TLS the server's certificate is
verified (CDP_SMTP_CA_FILE, else the system CAs).

How SMTP answers map to outcomes: 2xx accepted; a 5xx on the recipient (550 no such user, 553 bad address)
rejected; any other 5xx failed and not retryable (the message or our account is at fault); 4xx, connection
errors and timeouts failed and retryable; an AUTH failure failed, not retryable (fix the credentials).

A relay that does not answer: the connection and the server's greeting get CDP_SMTP_CONNECT_TIMEOUT (10 s),
every command after it CDP_SMTP_TIMEOUT (30 s). Reasons: ``connect`` when the connection is refused or
unreachable (an immediate answer), ``timeout`` when the relay says nothing in time - it accepted the
connection and sent no greeting (a stopped or wedged relay: the kernel still accepts for it), the
connection itself hung, or a command went unanswered - and ``disconnected`` when it hung up. The dispatcher
stops waiting on a relay that keeps timing out (`dispatch.py`, its breaker) and asks `probe` - a greeting,
no message - until it answers again. The sends run in this channel's own threads (`WORKERS`), not
asyncio's default pool, which a 2-core machine sizes at 6 threads: a relay that hangs holds only this
channel's threads, and the dispatcher's concurrency is what bounds them.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import formatdate

from cdp_orchestration.channels.base import Action, Channel, Outcome, log_fields
from cdp_orchestration.channels.settings import SmtpSettings

log = logging.getLogger("cdp.orchestration.channels.email")

# Threads sending email at most (made as needed): above any dispatcher concurrency one sets
# (CDP_ORCHESTRATION_DISPATCH_CONCURRENCY, 16 by default), which is what bounds the sends in flight.
WORKERS = 64


class EmailChannel(Channel):
    name = "email"

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._tls: ssl.SSLContext | None = None
        if settings.security != "none":
            self._tls = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cdp-smtp")

    def message_id(self, action: Action) -> str:
        return f"<{action.action_id}@{self._settings.message_id_domain}>"

    def build(self, action: Action) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self._settings.sender
        message["To"] = action.address
        message["Subject"] = action.content.subject or ""
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = self.message_id(action)
        message["X-CDP-Action-Id"] = action.action_id
        unsubscribe = action.content.data.get("unsubscribe_url")
        if unsubscribe:
            # RFC 2369 and RFC 8058 one-click unsubscribe: what large mailbox providers require of bulk mail.
            message["List-Unsubscribe"] = f"<{unsubscribe}>"
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(action.content.body)
        if action.content.html:
            message.add_alternative(action.content.html, subtype="html")
        return message

    async def send(self, action: Action) -> Outcome:
        if "@" not in action.address or any(c in action.address for c in "\r\n<>"):
            outcome = Outcome.rejected("invalid_address")
        else:
            try:
                message: EmailMessage | None = self.build(action)
            except (ValueError, TypeError):  # a header with a line break, say: this content never sends
                message, outcome = None, Outcome.failed("invalid_message", retryable=False)
            if message is not None:
                try:
                    loop = asyncio.get_running_loop()
                    outcome = await loop.run_in_executor(self._pool, self._send_blocking, message)
                except Exception as exc:  # an unexpected fault must become an outcome, not a crash
                    outcome = Outcome.failed(f"error_{type(exc).__name__}", retryable=True)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "email %s", outcome.status, extra=log_fields(action, reason=outcome.reason))
        return outcome

    probes = True

    async def probe(self, action: Action) -> bool:
        """The relay's greeting within CDP_SMTP_CONNECT_TIMEOUT (then QUIT): no message is sent. A refused
        connection is an answer too (sends fail at once with ``connect``: nothing waits)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._greeted)

    def _greeted(self) -> bool:
        try:
            client = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            return not _timed_out(exc)
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
        return True

    async def close(self) -> None:
        # A send still waiting on a relay ends by its own timeout; nothing waits for it here.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> smtplib.SMTP:
        """A connection the relay greeted: the connection, the TLS handshake (implicit TLS) and the greeting
        within CDP_SMTP_CONNECT_TIMEOUT; each command from then on gets CDP_SMTP_TIMEOUT."""
        s = self._settings
        if s.security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=s.connect_timeout, context=self._tls)
        else:
            client = smtplib.SMTP(s.host, s.port, timeout=s.connect_timeout)
        client.timeout = s.timeout
        if client.sock is not None:
            client.sock.settimeout(s.timeout)
        return client

    def _send_blocking(self, message: EmailMessage) -> Outcome:
        s = self._settings
        try:
            client = self._connect()
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome.failed("timeout" if _timed_out(exc) else "connect", retryable=True)
        try:
            with client:
                client.ehlo_or_helo_if_needed()
                if s.security == "starttls":
                    client.starttls(context=self._tls)
                    client.ehlo()
                if s.username is not None:
                    client.login(s.username, s.password or "")
                refused = client.send_message(message)
        except smtplib.SMTPAuthenticationError as exc:
            # 535 (credentials refused) is final; 454 is the relay's own authentication failing for now
            # (RFC 4954 "temporary server failure"): tried again, as any 4xx.
            return Outcome.failed(f"smtp_auth_{exc.smtp_code}", retryable=400 <= exc.smtp_code < 500)
        except smtplib.SMTPRecipientsRefused as exc:
            (code, _), *_ = exc.recipients.values()
            return _refused(code)
        except smtplib.SMTPNotSupportedError:
            return Outcome.failed("smtp_not_supported", retryable=False)
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused, other replies
            return Outcome.failed(f"smtp_{exc.smtp_code}", retryable=400 <= exc.smtp_code < 500)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            return Outcome.failed("timeout" if _timed_out(exc) else "disconnected", retryable=True)
        if refused:  # one recipient only, so this does not happen; kept for the contract's sake
            (code, _), *_ = refused.values()
            return _refused(code)
        return Outcome.accepted(provider_id=message["Message-ID"])


def _timed_out(exc: BaseException) -> bool:
    """Whether the relay said nothing in time: a socket timeout, raised as is or wrapped by smtplib (a
    greeting or a reply not read in time becomes SMTPServerDisconnected, the timeout its context)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TimeoutError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _refused(code: int) -> Outcome:
    if 500 <= code < 600:
        return Outcome.rejected(f"smtp_{code}")
    return Outcome.failed(f"smtp_{code}", retryable=True)
