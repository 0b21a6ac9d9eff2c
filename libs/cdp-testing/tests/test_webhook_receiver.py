"""The local webhook receiver, as `make up` runs it in another process: what it accepted can be read
back over HTTP, in order, with the time each arrived."""

import hashlib
import hmac
import json
import time

import aiohttp

from cdp_testing.channels.webhook import LocalWebhookReceiver

SECRET = "s" * 32


def sign(timestamp: int, url: str, body: bytes) -> str:  # what orchestration's webhook channel sends
    signed = f"{timestamp}.POST {url}.".encode() + body
    return "v2=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()


async def test_what_the_receiver_accepted_is_listed_over_http_with_its_arrival_time():
    async with LocalWebhookReceiver(secret=SECRET, slack=True) as receiver, aiohttp.ClientSession() as http:
        before = time.time()
        for n, key in enumerate(("a-1", "a-2", "a-1")):  # the third is a replay of the first
            body = json.dumps({"text": f"price drop {n}"}).encode()
            stamp = int(time.time())
            headers = {"X-CDP-Timestamp": str(stamp), "X-CDP-Signature": sign(stamp, receiver.url(), body),
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


async def test_a_request_signed_for_another_url_or_with_v1_is_refused():
    async with LocalWebhookReceiver(secret=SECRET) as receiver, aiohttp.ClientSession() as http:
        body = b'{"text": "hi"}'
        stamp = int(time.time())
        v1 = "v1=" + hmac.new(SECRET.encode(), str(stamp).encode() + b"." + body, hashlib.sha256).hexdigest()
        signatures = {
            "v1, no destination": v1,
            "another receiver": sign(stamp, "http://127.0.0.1:1/hooks/cdp", body),
            "another path": sign(stamp, f"{receiver.base_url}/hooks/other", body),
            "this one": sign(stamp, receiver.url(), body),
            "this one by the name localhost": sign(stamp, f"http://localhost:{receiver.port}/hooks/cdp", body),
        }
        answers = {}
        for name, signature in signatures.items():
            headers = {"X-CDP-Timestamp": str(stamp), "X-CDP-Signature": signature, "Idempotency-Key": name}
            async with http.post(receiver.url(), data=body, headers=headers) as answer:
                answers[name] = answer.status
    assert answers == {
        "v1, no destination": 401,
        "another receiver": 401,
        "another path": 401,
        "this one": 200,
        "this one by the name localhost": 200,
    }
    assert receiver.refused_signatures == 3
