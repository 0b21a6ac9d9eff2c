"""NATS credentials in the chart rotate make before break (natsAuth.rotate): the component's user takes
the generation's name, keeps its role's permissions, and the rendered auth.conf runs in a real nats-server
where the service connects as that user. The two upgrades of a rotation read the cluster's Secret
(`lookup`, which answers nothing offline): here it is answered with what the Secret would hold. What the
rotation relies on in the pods (a bus follows a rewritten file while the server accepts both users) is
libs/cdp-kit/tests/test_natsauth.py's rotation test."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import bcrypt
import pytest
import yaml
from chart_support import RELEASE, SCENARIOS, Rendered, chart_under_test, effective_values, request, run_helm
from test_chart_security import components, nats_users

from cdp_kit.natsauth import expand, permissions_document


def render(set_values: dict) -> Rendered:
    scenario = {**SCENARIOS["prod"], "set_values": set_values}
    (result,) = run_helm([request("template", scenario)])
    assert result["ok"], result.get("error")
    objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
    return Rendered("rotated", effective_values(scenario), objects)


@pytest.fixture(scope="module")
def rotated() -> Rendered:
    return render({"natsAuth": {"enabled": True, "rotate": {"profile": 2}}})


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def credentials(r: Rendered, name: str) -> dict:
    return json.loads(r.get("Secret", f"{RELEASE}-{name}-nats")["stringData"]["credentials.json"])


def test_a_rotated_component_connects_as_its_generation_with_its_roles_permissions(rotated):
    users = {u["user"]: u for u in nats_users(rotated)}
    assert credentials(rotated, "profile")["user"] == "profile.2"
    assert verifies(credentials(rotated, "profile")["password"], users["profile.2"]["password"])
    assert "profile" not in users  # nothing held before (offline): only the new user
    c = components(rotated)["profile"]
    scaling = {**rotated.values["componentDefaults"]["autoscaling"], **(c.get("autoscaling") or {})}
    replicas = max(int(c["replicas"]), int(scaling["maxReplicas"])) if scaling["enabled"] else int(c["replicas"])
    partitions = int(rotated.values["global"]["partitions"])
    wanted = expand(permissions_document()["profile"], partitions=partitions, replicas=replicas)
    assert users["profile.2"]["permissions"] == wanted
    assert credentials(rotated, "identity")["user"] == "identity"  # the others untouched


def verifies(password: str, hashed: str) -> bool:
    """auth.conf holds bcrypt hashes (nats-server checks a password against them), never a password."""
    return hashed.startswith("$2") and bcrypt.checkpw(password.encode(), hashed.encode())


def render_over(held: dict, set_values: dict, folder: Path, held_hash: str | None = None) -> Rendered:
    """A render as `helm upgrade` makes it over a release whose profile Secret holds `held` (and `held_hash`
    as password.bcrypt, when given): the chart with its `lookup` answered from them (offline, lookup
    answers nothing)."""
    chart = folder / "cdp"
    shutil.copytree(chart_under_test(), chart)
    template = chart / "templates" / "secret-nats.yaml"
    data = base64.b64encode(json.dumps(held).encode()).decode()
    keys = f'"credentials.json" "{data}"'
    if held_hash is not None:
        keys += f' "password.bcrypt" "{base64.b64encode(held_hash.encode()).decode()}"'
    cluster = f'(dict "{RELEASE}-profile-nats" (dict "data" (dict {keys})))'
    text = template.read_text()
    call = 'lookup "v1" "Secret" $.Release.Namespace $secretName'
    assert call in text
    template.write_text(text.replace(call, f"get {cluster} $secretName"))
    scenario = {**SCENARIOS["prod"], "set_values": set_values}
    (result,) = run_helm([{**request("template", scenario), "chart": str(chart)}])
    assert result["ok"], result.get("error")
    objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
    return Rendered("upgrade", effective_values(scenario), objects)


def test_an_upgrade_raising_the_generation_keeps_the_held_user_until_the_next(tmp_path):
    values = {"natsAuth": {"enabled": True, "rotate": {"profile": 2}}}
    # Upgrade 1: the Secret holds `profile`. The server gets both users, the Secret the new one.
    first = render_over({"user": "profile", "password": "held-password"}, values, tmp_path / "1")
    users = {u["user"]: u for u in nats_users(first)}
    new = credentials(first, "profile")
    assert new["user"] == "profile.2" and new["password"] != "held-password"
    assert verifies("held-password", users["profile"]["password"])
    assert verifies(new["password"], users["profile.2"]["password"])
    assert users["profile"]["permissions"] == users["profile.2"]["permissions"]
    # Upgrade 2, same values: the Secret holds `profile.2`, so the old user is gone and the password kept.
    new_hash = first.get("Secret", f"{RELEASE}-profile-nats")["stringData"]["password.bcrypt"]
    second = render_over(new, values, tmp_path / "2", held_hash=new_hash)
    users = {u["user"]: u for u in nats_users(second)}
    assert "profile" not in users and verifies(new["password"], users["profile.2"]["password"])
    assert credentials(second, "profile") == new
    # The hash kept in the Secret is reused, not made again with a new salt: auth.conf does not change
    # at every upgrade (nats-server checks every connected client again at each reload).
    assert users["profile.2"]["password"] == new_hash
    # Without a rotation, an upgrade keeps the held user and password, alone.
    kept = render_over(
        {"user": "profile", "password": "held-password"}, {"natsAuth": {"enabled": True}}, tmp_path / "3"
    )
    assert [u["user"] for u in nats_users(kept) if u["user"].startswith("profile")] == ["profile"]
    assert credentials(kept, "profile") == {"user": "profile", "password": "held-password"}
    assert verifies("held-password", {u["user"]: u for u in nats_users(kept)}["profile"]["password"])


def test_a_generation_must_be_a_whole_number():
    scenario = {**SCENARIOS["prod"], "set_values": {"natsAuth": {"enabled": True, "rotate": {"profile": "two"}}}}
    (result,) = run_helm([request("template", scenario)])
    assert not result["ok"] and "rotate" in result["error"]


async def test_the_rotated_user_works_in_a_real_nats_server(rotated, tmp_path):
    import nats.errors

    from cdp_kit.bus import Bus, profiles_stream, subjects
    from cdp_kit.natsauth import NatsClientSettings
    from cdp_kit.natsserver import NatsServer
    from cdp_kit.provision import run as provision_run

    auth = rotated.get("Secret", f"{RELEASE}-nats-auth")["stringData"]["auth.conf"]
    path = write_json(Path(tmp_path / "profile.json"), credentials(rotated, "profile"))
    with NatsServer(store_dir=tmp_path / "nats", config=auth) as server:
        # The chart's provisioning Job makes the streams first, as its own user (test_chart_provision).
        made = write_json(Path(tmp_path / "provision.json"), credentials(rotated, "provision"))
        await provision_run(server.url, environ={}, security=NatsClientSettings(credentials_file=made))
        security = NatsClientSettings(credentials_file=path)
        async with Bus.connect(server.url, name="profile", security=security) as profile:
            await profile.ensure_streams(profiles_stream())
            assert (await profile.js.publish(subjects.profiles_changed(0), b"ok", timeout=5)).seq == 1
            with pytest.raises(nats.errors.TimeoutError):  # still only profile's permissions
                await profile.js.publish(subjects.events_resolved(0), b"forged", timeout=1)
