"""Egress network policies (networkPolicy.egress): off by default; on, each component reaches exactly
DNS, NATS, the components its `calls` name (itself with callsSelf), its store, the API server when it takes
Leases, the OTLP collector, and what the values add; a destination nobody gave fails the render by name."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_support import KUBE_VERSIONS, RELEASE, SCENARIOS, Rendered, effective_values, request, run_helm
from test_chart_security import components

PROD = SCENARIOS["prod"]["values_files"]
DNS = [
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
]
STORE = [{"ipBlock": {"cidr": "10.9.0.0/24"}}]
API_SERVER = [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
COLLECTOR = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
CRM_RULE = {
    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
    "ports": [{"port": 443, "protocol": "TCP"}],
}
EGRESS_ON = {
    "nats": {"enabled": True},
    "global": {"otlpEndpoint": "http://otel-collector.observability:4318"},
    "networkPolicy": {
        "enabled": True,
        "egress": {
            "enabled": True,
            "storeTo": STORE,
            "apiServerTo": API_SERVER,
            "telemetryTo": COLLECTOR,
            "extra": {"crm": [CRM_RULE]},
            "allowInternet": ["orchestration"],
        },
    },
}
NATS_EXTERNAL = {
    "global": {"natsUrl": "nats://nats.messaging:4333"},
    "networkPolicy": {
        "enabled": True,
        "egress": {
            "enabled": True,
            "natsTo": [{"ipBlock": {"cidr": "10.5.0.0/24"}}],
            "allowInternet": ["crm", "orchestration"],
        },
    },
}
CASES = {
    "prod-egress": {"values_files": PROD, "set_values": EGRESS_ON},
    "nats-external": {"set_values": NATS_EXTERNAL},
    "crm-unconfigured": {
        "set_values": {"networkPolicy": {"enabled": True, "egress": {"enabled": True, "natsTo": [{}]}}}
    },
    "orchestration-unconfigured": {
        "set_values": {
            "networkPolicy": {"enabled": True, "egress": {"enabled": True, "natsTo": [{}], "allowInternet": ["crm"]}}
        }
    },
    "nats-unconfigured": {
        "set_values": {
            "networkPolicy": {"enabled": True, "egress": {"enabled": True, "allowInternet": ["crm", "orchestration"]}}
        }
    },
}


@pytest.fixture(scope="module")
def renders() -> dict[str, Rendered | str]:
    """Each case rendered (with its effective values), or helm's error."""
    names = list(CASES)
    out: dict[str, Rendered | str] = {}
    for name, result in zip(names, run_helm([request("template", CASES[n]) for n in names]), strict=True):
        if result["ok"]:
            objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
            out[name] = Rendered(name, effective_values(CASES[name]), objects)
        else:
            out[name] = result["error"]
    return out


def component_label(peer: dict[str, Any]) -> str | None:
    labels = peer.get("podSelector", {}).get("matchLabels", {})
    if set(peer) == {"podSelector"} and labels.get("app.kubernetes.io/instance") == RELEASE:
        return labels.get("app.kubernetes.io/component") or f"nats:{labels.get('app.kubernetes.io/name')}"
    return None


def destinations(policy: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Each egress rule as (ports, peers), comparable and order-free."""
    out = []
    for rule in policy["spec"].get("egress") or []:
        ports = tuple(sorted((str(p.get("port")), p.get("protocol", "TCP")) for p in rule.get("ports", [])))
        peers = tuple(sorted(component_label(p) or yaml.safe_dump(p, sort_keys=True) for p in rule.get("to", [])))
        out.append((ports, peers))
    return sorted(out)


def dumped(peers: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(sorted(yaml.safe_dump(p, sort_keys=True) for p in peers))


@pytest.mark.parametrize("scenario", ["default", "prod", "secure", "everything"])
def test_egress_is_not_restricted_by_default(rendered, scenario):
    for policy in rendered[scenario].of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        assert "egress" not in policy["spec"], policy["metadata"]["name"]


def test_each_component_reaches_exactly_dns_nats_its_callees_and_its_store(renders):
    r = renders["prod-egress"]
    assert isinstance(r, Rendered), r
    mine = components(r)
    assert {"crm", "orchestration"} <= set(mine)
    for name, c in mine.items():
        policy = r.get("NetworkPolicy", f"{RELEASE}-{name}")
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        callees = set(c.get("calls") or []) | ({name} if c.get("callsSelf") else set())
        expected = [
            ((("53", "TCP"), ("53", "UDP")), dumped(DNS)),
            ((("4222", "TCP"),), ("nats:nats",)),
            ((("4318", "TCP"),), dumped(COLLECTOR)),
        ]
        if callees:
            expected.append(((("grpc", "TCP"),), tuple(sorted(callees))))
        if c["store"]["kind"] == "mongodb":
            expected.append(((("27017", "TCP"),), dumped(STORE)))
        if c.get("ownership") == "kubernetes":
            expected.append(((("443", "TCP"), ("6443", "TCP")), dumped(API_SERVER)))
        if name == "crm":
            expected.append(((("443", "TCP"),), dumped(CRM_RULE["to"])))
        if name == "orchestration":
            internet = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}
            expected.append(((), dumped([internet])))
        assert destinations(policy) == sorted(expected), name


def test_an_external_nats_is_reached_on_the_port_of_its_url(renders):
    r = renders["nats-external"]
    assert isinstance(r, Rendered), r
    for name in components(r):
        rules = destinations(r.get("NetworkPolicy", f"{RELEASE}-{name}"))
        assert ((("4333", "TCP"),), dumped([{"ipBlock": {"cidr": "10.5.0.0/24"}}])) in rules, name


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("crm-unconfigured", "networkPolicy.egress.extra.crm"),
        ("orchestration-unconfigured", "networkPolicy.egress.extra.orchestration"),
        ("nats-unconfigured", "networkPolicy.egress.natsTo"),
    ],
)
def test_a_destination_nobody_gave_fails_the_render_by_name(renders, case, named):
    error = renders[case]
    assert isinstance(error, str), f"{case} rendered"
    assert named in error


@pytest.mark.parametrize("case", ["prod-egress", "nats-external"])
def test_egress_policies_pass_kubernetes_strict_schema(renders, case):
    r = renders[case]
    assert isinstance(r, Rendered), r
    problems = []
    for policy in r.of_kind("NetworkPolicy"):
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(policy, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{r.describe(policy)} on {version}: {exc.message} at {list(exc.path)}")
    assert not problems, "\n".join(problems)
