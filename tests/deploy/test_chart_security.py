"""Security between services, as the chart renders it: network policies that match the `calls` graph,
one NATS user per component whose permissions come from the code's table (and which a real nats-server
enforces), and the tokens components present to their peers mounted as files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from chart_support import CHART, RELEASE, Rendered
from test_chart import env_of

from cdp_kit.natsauth import expand, permissions_document

POLICY_SCENARIOS = ("prod", "everything", "secure", "prod+newcomer")


def components(r: Rendered) -> dict[str, dict[str, Any]]:
    """Enabled components with their values merged over componentDefaults (one level, as the tests need)."""
    merged = {}
    for name, raw in r.values["components"].items():
        c = {**r.values["componentDefaults"], **(raw or {})}
        c["networkPolicy"] = {
            **r.values["componentDefaults"]["networkPolicy"],
            **((raw or {}).get("networkPolicy") or {}),
        }
        c["ports"] = {**r.values["componentDefaults"]["ports"], **((raw or {}).get("ports") or {})}
        if c.get("enabled", True):
            merged[name] = c
    return merged


def callers_of(r: Rendered, name: str) -> set[str]:
    """The components whose `calls` name it, and itself when its replicas call each other (callsSelf:
    profile forwards to a partition's holder, scoring and segmentation forward ExportPerson)."""
    mine = components(r)
    callers = {other for other, c in mine.items() if name in (c.get("calls") or [])}
    return callers | ({name} if mine[name].get("callsSelf") else set())


def rules_for(policy: dict[str, Any], port: str) -> list[dict[str, Any]]:
    return [rule for rule in policy["spec"].get("ingress") or [] if port in [p["port"] for p in rule.get("ports", [])]]


def split_peers(rule: dict[str, Any]) -> tuple[set[str], list[dict[str, Any]]]:
    """(components admitted by a podSelector on the component label, every other peer)."""
    named, others = set(), []
    for peer in rule.get("from", []):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if set(peer) == {"podSelector"} and "app.kubernetes.io/component" in labels:
            assert labels["app.kubernetes.io/instance"] == RELEASE
            named.add(labels["app.kubernetes.io/component"])
        else:
            others.append(peer)
    return named, others


@pytest.mark.parametrize("scenario", POLICY_SCENARIOS)
def test_every_network_policy_matches_the_calls_graph(rendered, scenario):
    r = rendered[scenario]
    policy_values = r.values["networkPolicy"]
    release_pods = {
        "podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "cdp"}}
    }
    for name, c in components(r).items():
        policy = r.get("NetworkPolicy", f"{RELEASE}-{name}")
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        grpc, http, metrics = rules_for(policy, "grpc"), rules_for(policy, "http"), rules_for(policy, "metrics")
        if c["networkPolicy"].get("allowExternal"):
            assert [rule.get("from") for rule in grpc] == [None], f"{name}: the edge admits everyone"
        else:
            callers, expected_others = callers_of(r, name), policy_values.get("grpcFrom") or []
            if not callers and not expected_others:
                assert grpc == [], f"{name}: nobody calls it, so its gRPC port admits nobody"
            else:
                (rule,) = grpc
                named, others = split_peers(rule)
                assert named == callers, f"{name}: gRPC admits {named}, but its callers are {callers}"
                assert others == expected_others
            if c["ports"].get("http"):
                (rule,) = http
                assert rule["from"] == [release_pods, *(policy_values.get("httpFrom") or [])]
        if c["ports"].get("metrics") and policy_values.get("metricsFrom"):
            (rule,) = metrics
            assert rule["from"] == policy_values["metricsFrom"]
        else:
            assert metrics == []
        # No rule admits everyone except an edge component's.
        for rule in policy["spec"].get("ingress") or []:
            assert rule.get("from") or c["networkPolicy"].get("allowExternal"), f"{name}: a rule without peers"


def test_identity_admits_profile_alone_and_scoring_segmentation_alone(rendered):
    r = rendered["secure"]
    (rule,) = rules_for(r.get("NetworkPolicy", f"{RELEASE}-identity"), "grpc")
    assert split_peers(rule)[0] == {"profile"}
    (rule,) = rules_for(r.get("NetworkPolicy", f"{RELEASE}-profile"), "grpc")
    # And profile itself: a replica forwards a request to the one holding the person's partition.
    assert split_peers(rule)[0] == {"profile", "scoring", "segmentation", "orchestration", "crm"}
    (rule,) = rules_for(r.get("NetworkPolicy", f"{RELEASE}-scoring"), "grpc")
    # Segmentation asks scoring which scores its models write (a segment naming another is refused);
    # scoring's replicas forward ExportPerson to each other.
    assert split_peers(rule) == ({"segmentation", "scoring"}, r.values["networkPolicy"]["grpcFrom"])


def test_nats_admits_only_this_releases_cdp_pods(rendered):
    r = rendered["secure"]
    policy = r.get("NetworkPolicy", f"{RELEASE}-nats")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "nats",
        "app.kubernetes.io/instance": RELEASE,
    }
    (clients,) = rules_for(policy, 4222)
    assert clients["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "cdp"}}},
        *r.values["networkPolicy"]["natsFrom"],
    ]
    (routes,) = rules_for(policy, 6222)
    assert routes["from"] == [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]
    assert not rendered["prod"].of_kind("NetworkPolicy") or not [
        p for p in rendered["prod"].of_kind("NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-nats"
    ], "no policy for a NATS outside the release"


# --- NATS users -------------------------------------------------------------------------------------------


def test_the_charts_permission_table_is_the_codes():
    on_disk = json.loads((CHART / "files" / "nats-permissions.json").read_text())
    assert on_disk == permissions_document(), (
        "deploy/helm/cdp/files/nats-permissions.json is stale: "
        ".venv/bin/python -m cdp_kit.natsauth > deploy/helm/cdp/files/nats-permissions.json"
    )


def auth_conf(r: Rendered) -> str:
    return r.get("Secret", f"{RELEASE}-nats-auth")["stringData"]["auth.conf"]


def nats_users(r: Rendered) -> list[dict[str, Any]]:
    text = auth_conf(r)
    users = text[text.index("users = ") + len("users = ") : text.rindex("}")].strip()
    return json.loads(users)


@pytest.mark.parametrize("scenario", ("prod", "secure"))
def test_each_component_connects_as_its_own_nats_user(rendered, scenario):
    r = rendered[scenario]
    roles = permissions_document()
    users = {u["user"]: u for u in nats_users(r)}
    assert set(users) == set(components(r)) | {"provision"}  # and the provisioning Job's (test_chart_provision)
    for workload in r.component_workloads():
        name = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = workload["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = env_of(container)
        assert env["CDP_NATS_CREDENTIALS_FILE"]["value"] == "/etc/cdp/nats/credentials.json"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "nats-credentials"]
        assert volume["secret"]["secretName"] == f"{RELEASE}-{name}-nats", "its own Secret, no other"
        credentials = json.loads(r.get("Secret", f"{RELEASE}-{name}-nats")["stringData"]["credentials.json"])
        assert credentials["user"] == name and len(credentials["password"]) >= 32
        # nats-server knows a bcrypt hash of the same password (never the password: it warns about those),
        # the one the component's Secret keeps beside it, and the permissions of the component's role.
        held = users[name]["password"]
        assert held.startswith("$2") and credentials["password"] not in auth_conf(r)
        assert bcrypt.checkpw(credentials["password"].encode(), held.encode())
        assert r.get("Secret", f"{RELEASE}-{name}-nats")["stringData"]["password.bcrypt"] == held
        # Consumer names per partition and per replica spelled out for this release's values.
        c = components(r)[name]
        scaling = {**r.values["componentDefaults"]["autoscaling"], **(c.get("autoscaling") or {})}
        replicas = int(c["replicas"])
        if scaling["enabled"]:
            replicas = max(replicas, int(scaling["maxReplicas"]))
        wanted = {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}
        if name in roles:
            wanted = expand(roles[name], partitions=int(r.values["global"]["partitions"]), replicas=replicas)
        assert users[name]["permissions"] == wanted
        if scenario == "secure":
            assert env["CDP_NATS_TLS_CA_FILE"]["value"] == "/etc/cdp/nats-tls/ca.crt"
            assert env["CDP_NATS_TLS_CERT_FILE"]["value"] == "/etc/cdp/nats-tls/tls.crt"
        else:
            assert "CDP_NATS_TLS_CA_FILE" not in env
    assert not [s for s in rendered["default"].of_kind("Secret") if s["metadata"]["name"].endswith("-nats")]


async def test_a_real_nats_server_enforces_the_charts_users(rendered, tmp_path):
    """The rendered auth.conf, as is, in a real nats-server: identity publishes events.resolved, profile
    may not."""
    import nats.errors

    from cdp_kit.bus import Bus, events_resolved_stream, subjects
    from cdp_kit.natsauth import NatsClientSettings
    from cdp_kit.natsserver import NatsServer
    from cdp_kit.provision import run as provision_run

    r = rendered["prod"]
    auth = r.get("Secret", f"{RELEASE}-nats-auth")["stringData"]["auth.conf"]

    def security(name: str) -> NatsClientSettings:
        path = Path(tmp_path / f"{name}.json")
        path.write_text(r.get("Secret", f"{RELEASE}-{name}-nats")["stringData"]["credentials.json"])
        return NatsClientSettings(credentials_file=path)

    with NatsServer(store_dir=tmp_path / "nats", config=auth) as server:
        # The provisioning Job first, as its own user: no component's may create a stream.
        await provision_run(server.url, environ={}, security=security("provision"))
        async with Bus.connect(server.url, name="identity", security=security("identity")) as identity:
            await identity.ensure_streams(events_resolved_stream())
            assert (await identity.js.publish(subjects.events_resolved(0), b"ok", timeout=5)).seq == 1
        async with Bus.connect(server.url, name="profile", security=security("profile")) as profile:
            with pytest.raises(nats.errors.TimeoutError):
                await profile.js.publish(subjects.events_resolved(0), b"forged", timeout=1)


# --- tokens to peers --------------------------------------------------------------------------------------


def test_each_caller_mounts_only_its_own_token_as_a_file(rendered):
    r = rendered["prod"]
    secret = r.values["serviceTokens"]["existingSecret"]
    for workload in r.component_workloads():
        name = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        calls = components(r)[name].get("calls") or []
        spec = workload["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = env_of(container)
        volumes = [v for v in spec["volumes"] if v["name"] == "peer-token"]
        if not calls:
            assert volumes == [] and not [v for v in env if v.endswith("_TOKEN_FILE")]
            continue
        (volume,) = volumes
        assert volume["secret"] == {
            "secretName": secret,
            "defaultMode": 0o440,
            "items": [{"key": name, "path": "token"}],
        }
        for peer in calls:
            variable = f"CDP_{peer.upper().replace('-', '_')}_TOKEN_FILE"
            assert env[variable]["value"] == "/etc/cdp/peer-token/token"
            assert f"CDP_{peer.upper().replace('-', '_')}_TOKEN" not in env, "a file, not a variable"
