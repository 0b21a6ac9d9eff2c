"""The local webhook receiver, as `make up` runs it in another process: what it accepted can be read
back over HTTP, in order, with the time each arrived."""

import hashlib
import hmac
import json
import time

import aiohttp

from cdp_testing.channels.webhook import LocalWebhookReceiver

SECRET = "s" * 32


def sign(timestamp: int, body: bytes) -> str:  # what orchestration's webhook channel sends
    return "v1=" + hmac.new(SECRET.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


async def test_what_the_receiver_accepted_is_listed_over_http_with_its_arrival_time():
    async with LocalWebhookReceiver(secret=SECRET, slack=True) as receiver, aiohttp.ClientSession() as http:
        before = time.time()
        for n, key in enumerate(("a-1", "a-2", "a-1")):  # the third is a replay of the first
            body = json.dumps({"text": f"price drop {n}"}).encode()
            stamp = int(time.time())
            headers = {"X-CDP-Timestamp": str(stamp), "X-CDP-Signature": sign(stamp, body),
                       "Idempotency-Key": key}  # fmt: skip
            async with http.post(receiver.url(), data=body, headers=headers) as answer:
                assert answer.status == 200
        async with http.post(receiver.url(), data=b'{"text": "unsigned"}') as answer:
            assert answer.status == 401
        async with http.get(f"{receiver.base_url}/_deliveries") as answer:
            listed = await answer.json()
    assert [(d["idempotency_key"], d["json"]["text"]) for d in listed] == [
        ("a-1", "price drop 0"),
        ("a-2", "price drop 1"),
    ]
    assert all(d["path"] == "/hooks/cdp" and before <= d["received_at"] <= time.time() for d in listed)
