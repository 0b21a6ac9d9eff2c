"""Push through FCM HTTP v1 against a local FCM and OAuth2 token endpoint that verify what Google verifies."""

from __future__ import annotations

import asyncio
import json

import pytest

from cdp_kit.settings import SettingsError, load_settings
from cdp_orchestration.channels.base import Action, Content
from cdp_orchestration.channels.push import FcmChannel
from cdp_orchestration.channels.settings import FcmSettings
from cdp_testing.channels.fcm import LocalFcm


def settings_for(fcm: LocalFcm, key_file, **more: str) -> FcmSettings:
    environ = {"CDP_FCM_CREDENTIALS_FILE": str(key_file), "CDP_FCM_API_URL": fcm.base_url, **more}
    return load_settings(FcmSettings, environ)


def push(token: str = "device-token-1", action_id: str = "act-1", **content) -> Action:
    content = content or {"title": "Back in stock", "body": "Your size is back", "url": "https://shop/p/1"}
    return Action(action_id=action_id, person_id="person-1", channel="push", address=token, content=Content(**content))


async def test_a_push_is_delivered_with_a_token_from_the_service_account(tmp_path):
    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")
        async with FcmChannel(settings_for(fcm, key_file)) as channel:
            outcome = await channel.send(push())
        assert outcome.status == "accepted"
        (delivered,) = fcm.delivered
        assert outcome.provider_id == delivered.name
        assert delivered.message == {
            "token": "device-token-1",
            "notification": {"title": "Back in stock", "body": "Your size is back"},
            "data": {"action_id": "act-1", "url": "https://shop/p/1"},
        }
        assert fcm.grant_errors == []


async def test_the_access_token_is_fetched_once_for_concurrent_sends_and_refreshed_near_expiry(tmp_path):
    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")
        async with FcmChannel(settings_for(fcm, key_file)) as channel:
            outcomes = await asyncio.gather(*(channel.send(push(action_id=f"act-{n}")) for n in range(5)))
            assert {o.status for o in outcomes} == {"accepted"}
            assert fcm.tokens_issued == 1
        fcm.token_lifetime = 30  # inside the refresh margin: every send fetches a fresh token
        async with FcmChannel(settings_for(fcm, key_file)) as channel:
            await channel.send(push(action_id="act-a"))
            await channel.send(push(action_id="act-b"))
        assert fcm.tokens_issued == 3


async def test_a_revoked_token_is_replaced_once(tmp_path):
    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")
        async with FcmChannel(settings_for(fcm, key_file)) as channel:
            await channel.send(push(action_id="act-1"))
            fcm.expire_tokens()
            assert (await channel.send(push(action_id="act-2"))).status == "accepted"
        assert fcm.tokens_issued == 2 and len(fcm.delivered) == 2


async def test_a_key_the_server_does_not_know_is_refused_at_the_token_endpoint(tmp_path):
    async with LocalFcm("shop-app") as fcm, LocalFcm("shop-app") as other:
        stranger = other.service_account(tmp_path / "other.json")
        info = json.loads(stranger.read_text())
        info["token_uri"] = fcm.token_uri
        stranger.write_text(json.dumps(info))
        async with FcmChannel(settings_for(fcm, stranger)) as channel:
            outcome = await channel.send(push())
        assert (outcome.status, outcome.reason, outcome.retryable) == ("failed", "oauth_invalid_grant", False)
        assert fcm.grant_errors == ["Invalid JWT Signature."] and fcm.delivered == []


async def test_dead_tokens_are_rejected_and_outages_are_retryable(tmp_path):
    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")
        fcm.unregistered.add("dead-token")
        async with FcmChannel(settings_for(fcm, key_file)) as channel:
            dead = await channel.send(push(token="dead-token"))
            fcm.fail_next(1, status=503)
            fcm.fail_next(1, status=429, retry_after="7")
            unavailable = await channel.send(push(action_id="act-2"))
            quota = await channel.send(push(action_id="act-3"))
            bad = await channel.send(push(action_id="act-4", body="x", data={"google.sent_time": "1"}))
        assert (dead.status, dead.reason) == ("rejected", "UNREGISTERED")
        assert (unavailable.status, unavailable.reason, unavailable.retryable) == ("failed", "UNAVAILABLE", True)
        assert (quota.reason, quota.retryable, quota.retry_after) == ("QUOTA_EXCEEDED", True, 7.0)
        assert (bad.status, bad.reason, bad.retryable) == ("failed", "INVALID_ARGUMENT", False)
        assert fcm.delivered == []


async def test_another_project_is_a_sender_mismatch(tmp_path):
    async with LocalFcm("shop-app") as fcm:
        key_file = fcm.service_account(tmp_path / "sa.json")
        async with FcmChannel(settings_for(fcm, key_file, CDP_FCM_PROJECT_ID="someone-else")) as channel:
            outcome = await channel.send(push())
        assert (outcome.status, outcome.reason) == ("rejected", "SENDER_ID_MISMATCH")


def test_a_bad_key_file_names_the_variable_and_the_field(tmp_path):
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps({"type": "service_account", "client_email": "x@y", "private_key": "nope"}))
    settings = load_settings(FcmSettings, {"CDP_FCM_CREDENTIALS_FILE": str(key_file)})
    with pytest.raises(SettingsError) as raised:
        FcmChannel(settings)
    assert "CDP_FCM_CREDENTIALS_FILE" in str(raised.value) and "private_key_id, token_uri" in str(raised.value)
    with pytest.raises(SettingsError, match=r"CDP_FCM_CREDENTIALS_FILE='/nowhere\.json' is not a readable file"):
        load_settings(FcmSettings, {"CDP_FCM_CREDENTIALS_FILE": "/nowhere.json"})
