"""Defects found by trying the platform as a customer, an operator and an attacker would (session 41).

Each test holds what someone relies on, and its docstring says what happened before its fix. The services
run in-process on a real nats-server (the `chain` fixture: collector, identity and profile; orchestration
beside them when a test needs it), and cdpctl runs as an operator runs it, as a process of its own.
"""

from __future__ import annotations

import asyncio
import time

from cdp.profile.v1 import profile_pb2

LONG_NAME = "Personalised offers from our partners in the travel, hotel and car rental business"


async def _consent_when(chain, user_id: str, ready, timeout: float = 15.0) -> dict[str, bool]:
    """The person's consent (key -> granted) once `ready(consent)` holds; the last one read otherwise."""
    deadline = time.monotonic() + timeout
    consent: dict[str, bool] = {}
    while time.monotonic() < deadline:
        profile = await chain.profile_of("user_id", user_id)
        if profile is not None:
            consent = {key: state.granted for key, state in profile.consent.items()}
            if ready(consent):
                return consent
        await asyncio.sleep(0.1)
    return consent


async def test_consent_under_any_category_name_an_sdk_sends_reaches_the_profile(chain):
    """Segment's consent context names categories as the workspace does ("Marketing Emails"), and a
    journey's action may name such a purpose. The collector stored the event (200), and the profile
    dropped every decision whose name had a space or a ':' or passed 64 characters, without a word: a
    journey under "Marketing Emails" answered "no consent" to a person who had granted it, and a later
    withdrawal would have been lost the same way."""
    status, answer = await chain.post(
        {
            "type": "identify",
            "userId": "s41-consent",
            "traits": {"email": "s41-consent@example.org"},
            "context": {
                "consent": {
                    "categoryPreferences": {
                        "Marketing Emails": True,
                        "Ads:Partner": False,
                        LONG_NAME: True,
                        "Analytics": True,
                    },
                    "channelPreferences": {"push notifications": False},
                }
            },
        }
    )
    assert (status, answer["accepted"]) == (200, 1), answer
    consent = await _consent_when(chain, "s41-consent", lambda c: "purpose:Analytics" in c)
    assert consent == {
        "purpose:Marketing Emails": True,
        "purpose:Ads:Partner": False,
        f"purpose:{LONG_NAME}": True,
        "purpose:Analytics": True,
        "channel:push notifications": False,
    }

    # The person withdraws it later: the later decision wins, as for any purpose.
    status, answer = await chain.post(
        {
            "type": "track",
            "userId": "s41-consent",
            "event": "Preferences Saved",
            "context": {"consent": {"categoryPreferences": {"Marketing Emails": False}}},
        }
    )
    assert (status, answer["accepted"]) == (200, 1), answer
    consent = await _consent_when(chain, "s41-consent", lambda c: c.get("purpose:Marketing Emails") is False)
    assert consent["purpose:Marketing Emails"] is False

    # The back office can record the same purpose (UpdateTraits' consent), as an event can.
    person = (await chain.profile_of("user_id", "s41-consent")).person_id
    await chain.profile.UpdateTraits(
        profile_pb2.UpdateTraitsRequest(
            person_id=person, consent={"purpose:Marketing Emails": True}, request_id="s41-back-office"
        )
    )
    consent = await _consent_when(chain, "s41-consent", lambda c: c.get("purpose:Marketing Emails") is True)
    assert consent["purpose:Marketing Emails"] is True
    assert await chain.dead_letters() == []
