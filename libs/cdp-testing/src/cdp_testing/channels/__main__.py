"""Run every local channel server until SIGINT/SIGTERM: what `make up` starts beside the services.

    python -m cdp_testing.channels --maildir .cdp/mail --fcm-key-file .cdp/fcm-key.json

Its log is JSON lines (`cdp_testing.channels.logs`): on stdout the one saying where each server listens
(`endpoints`: each URL, and the SMTP host:port) once all do, on stderr the rest. Mail lands in the
maildir (or mbox) so it can be read with any mail client or `ls`; the FCM server writes a service-account
key file it trusts, for CDP_FCM_CREDENTIALS_FILE. The Twilio account and the webhook secret default to the
same variables the orchestration service reads, so both sides agree without more configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from cdp_testing.channels import logs
from cdp_testing.channels.fcm import LocalFcm
from cdp_testing.channels.smtp import LocalSmtpServer
from cdp_testing.channels.twilio import LocalTwilio
from cdp_testing.channels.webhook import LocalWebhookReceiver
from cdp_testing.channels.webpush import LocalPushService


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    environ = os.environ
    parser = logs.ArgumentParser(prog="python -m cdp_testing.channels", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address every server binds")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--maildir", type=Path, help="write accepted mail to this maildir")
    parser.add_argument("--mbox", type=Path, help="write accepted mail to this mbox file")
    parser.add_argument("--twilio-port", type=int, default=8025)
    parser.add_argument("--twilio-account-sid", default=environ.get("CDP_TWILIO_ACCOUNT_SID", "AC" + "0" * 32))
    parser.add_argument("--twilio-auth-token", default=environ.get("CDP_TWILIO_AUTH_TOKEN", "local-twilio-token"))
    parser.add_argument("--fcm-port", type=int, default=8026)
    parser.add_argument("--fcm-project", default=environ.get("CDP_FCM_PROJECT_ID", "cdp-local"))
    parser.add_argument("--fcm-key-file", type=Path, help="write a service-account key the FCM server trusts")
    parser.add_argument("--webpush-port", type=int, default=8027)
    parser.add_argument("--webhook-port", type=int, default=8028)
    parser.add_argument("--webhook-secret", default=environ.get("CDP_WEBHOOK_SECRET"))
    return parser.parse_args(argv)


async def serve(
    args: argparse.Namespace, stop: asyncio.Event, ready: asyncio.Future[dict[str, object]] | None = None
) -> None:
    """Run the servers until `stop` is set; `ready` gets the endpoints once all listen."""
    async with contextlib.AsyncExitStack() as stack:
        smtp = await stack.enter_async_context(
            LocalSmtpServer(host=args.host, port=args.smtp_port, maildir=args.maildir, mbox=args.mbox)
        )
        twilio = await stack.enter_async_context(
            LocalTwilio(args.twilio_account_sid, args.twilio_auth_token, host=args.host, port=args.twilio_port)
        )
        fcm = await stack.enter_async_context(LocalFcm(args.fcm_project, host=args.host, port=args.fcm_port))
        if args.fcm_key_file is not None:
            args.fcm_key_file.parent.mkdir(parents=True, exist_ok=True)
            fcm.service_account(args.fcm_key_file)
        push = await stack.enter_async_context(LocalPushService(host=args.host, port=args.webpush_port))
        webhook = await stack.enter_async_context(
            LocalWebhookReceiver(secret=args.webhook_secret, host=args.host, port=args.webhook_port)
        )
        endpoints: dict[str, object] = {
            "smtp": f"{smtp.host}:{smtp.port}",
            "twilio": twilio.base_url,
            "fcm": fcm.base_url,
            "webpush": push.base_url,
            "webhook": webhook.url(),
        }
        logs.listening("listening", endpoints=endpoints)
        if ready is not None:
            ready.set_result(endpoints)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    logs.configure("channels")
    args = parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(args, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
