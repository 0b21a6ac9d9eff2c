"""What a Kubernetes review of the chart found, each held to what the code does: replicas that call each
other, the names TLS checks, the CA a caller trusts, start-up and stop windows the kubelet allows, the
collector's readiness, what the provisioning Job may read, identity's standby and rollouts, replica counts
that would lose state, and the deploy/README.md examples pods start from."""

from __future__ import annotations

import fnmatch
import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from chart_support import CHART, NAMESPACE, RELEASE, SCENARIOS, Rendered, request, run_helm
from test_chart import ALL, component_containers, env_of
from test_chart_security import components, rules_for, split_peers

ROOT = CHART.parents[2]
README = ROOT / "deploy" / "README.md"


def render(set_values: dict, values_files: list[str] | None = None) -> Rendered | str:
    """The chart rendered with `set_values` (over `values_files`), or helm's error."""
    scenario = {"values_files": values_files or [], "set_values": set_values}
    (result,) = run_helm([request("template", scenario)])
    if not result["ok"]:
        return result["error"]
    return Rendered("review", {}, [doc for doc in yaml.safe_load_all(result["manifest"]) if doc])


PROD = SCENARIOS["prod"]["values_files"]


# --- 1. replicas that call each other ------------------------------------------------------------------


def forwarding_services() -> set[str]:
    """Services whose replicas forward calls to each other: profile's Router, the kit's replica_owners
    (ExportPerson of a person another replica holds)."""
    found = set()
    for main in ROOT.glob("services/*/src/*/__main__.py"):
        text = main.read_text()
        if "replica_owners(" in text or re.search(r"\bRouter\(", text):
            found.add(main.parents[2].name)
    return found


def test_components_whose_replicas_forward_to_each_other_admit_themselves(rendered):
    forwarding = forwarding_services()
    assert {"profile", "scoring", "segmentation"} <= forwarding
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    flagged = {name for name, c in values["components"].items() if (c or {}).get("callsSelf")}
    assert flagged == forwarding & set(values["components"]), "callsSelf must follow the code"
    for scenario in ("prod", "secure", "everything"):
        r = rendered[scenario]
        for name in forwarding & set(components(r)):
            (rule,) = rules_for(r.get("NetworkPolicy", f"{RELEASE}-{name}"), "grpc")
            assert name in split_peers(rule)[0], f"{scenario}: {name}'s replicas cannot reach each other"


# --- 2. the names TLS checks --------------------------------------------------------------------------


def certificate_names(name: str) -> list[str]:
    """The names values.yaml tells the certificate to carry, for component `name` of this release."""
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("\ntls:") : text.index("\nnatsAuth:")]
    block = " ".join(line.strip().lstrip("#").strip() for line in block.splitlines())
    patterns = set(re.findall(r"(\*?\.?<release>-<name>[-\w<>.]*)", block))
    return [
        p.replace("<release>", RELEASE).replace("<name>", name).replace("<namespace>", NAMESPACE).rstrip(".")
        for p in patterns
    ]


def covered(host: str, names: list[str]) -> bool:
    # A wildcard stands for one DNS label, as in certificate matching.
    return any(
        fnmatch.fnmatchcase(host, n) and host.count(".") == n.count(".") if "*" in n else host == n for n in names
    )


def test_peers_are_dialled_by_the_names_the_certificate_must_carry(rendered):
    from cdp_kit.person_export import holder_address
    from cdp_profile.routing import holder_address as profile_holder_address

    r = rendered["prod"]
    services = {s["metadata"]["name"]: s for s in r.of_kind("Service")}
    for w, spec, c in component_containers(r):
        for variable, entry in env_of(c).items():
            if not (variable.startswith("CDP_") and variable.endswith("_ADDRESS")):
                continue
            peer = variable.removeprefix("CDP_").removesuffix("_ADDRESS").lower().replace("_", "-")
            service = services[f"{RELEASE}-{peer}"]
            (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
            # The Service in the cluster's DNS: the name a certificate can carry for it.
            assert entry["value"] == f"{RELEASE}-{peer}.{NAMESPACE}.svc:{port}", variable
            host = entry["value"].rsplit(":", 1)[0]
            assert covered(host, certificate_names(peer)), f"{host} is not among {certificate_names(peer)}"
    # Replicas forward to each other at the pod's name under the headless Service, which the code derives
    # from CDP_POD_NAME (the StatefulSet pod name the chart gives it).
    for sts in r.of_kind("StatefulSet"):
        name = component_of_workload(sts)
        if name not in forwarding_services():
            continue
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert env_of(c)["CDP_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert sts["spec"]["serviceName"] == f"{sts['metadata']['name']}-headless"
        for derive in (holder_address, profile_holder_address):
            host = derive(f"{sts['metadata']['name']}-1", 50051).rsplit(":", 1)[0]
            assert covered(host, certificate_names(name)), f"{host} is not among {certificate_names(name)}"
    readme = README.read_text()
    assert "cdp-<service>.cdp.svc" in readme and "*.cdp-<service>-headless" in readme


def component_of_workload(w: dict[str, Any]) -> str:
    return w["metadata"]["labels"]["app.kubernetes.io/component"]


# --- 3. the CA a caller trusts --------------------------------------------------------------------------


def test_tls_without_the_ca_for_callers_is_refused(rendered):
    # cdp_kit.service.client_channel trusts CDP_TLS_CLIENT_CA_FILE, or the system's CAs without it.
    refused = render({"tls": {"clientAuth": False}}, PROD)
    assert isinstance(refused, str) and "tls.clientAuth" in refused
    for w, spec, c in component_containers(rendered["prod"]):
        env = env_of(c)
        assert env["CDP_TLS_CLIENT_CA_FILE"]["value"] == "/etc/cdp/tls/ca.crt"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        assert {"key": "ca.crt", "path": "ca.crt"} in volume["secret"]["items"]


# --- 4. start-up ----------------------------------------------------------------------------------------


def startup_window(c: dict[str, Any]) -> int:
    probe = c["startupProbe"]
    return probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.parametrize("scenario", ALL)
def test_the_startup_window_covers_the_wait_for_the_provisioning_job_and_loading(scenario, rendered):
    r = rendered[scenario]
    load = r.values["componentDefaults"]["probes"]["startup"]["loadSeconds"]
    assert load >= 60
    for w, spec, c in component_containers(r):
        wait = int(env_of(c).get("CDP_NATS_PROVISION_WAIT", {}).get("value", 0))
        assert startup_window(c) >= wait + load, Rendered.describe(w)


def test_the_startup_window_follows_the_configured_wait():
    r = render({"natsAuth": {"provision": {"waitSeconds": 1500}}}, PROD)
    assert isinstance(r, Rendered), r
    for w, spec, c in component_containers(r):
        assert env_of(c)["CDP_NATS_PROVISION_WAIT"]["value"] == "1500"
        assert startup_window(c) >= 1500 + 120, Rendered.describe(w)


# --- 5. stopping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ALL)
def test_the_kubelet_waits_for_the_services_own_stop_bound_after_a_pre_stop_pause(scenario, rendered):
    from cdp_kit.service import stop_bound

    for w, spec, c in component_containers(rendered[scenario]):
        grace = int(env_of(c)["CDP_SHUTDOWN_GRACE"]["value"])
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep > 0, "endpoints must drop the pod before it stops taking calls"
        assert set(c["lifecycle"]["preStop"]) == {"sleep"}, "no exec: the image has no shell to spare"
        bound = stop_bound(SimpleNamespace(shutdown_grace=grace))
        assert spec["terminationGracePeriodSeconds"] > sleep + bound, Rendered.describe(w)


# --- 6. the collector's readiness -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ALL)
def test_the_collector_is_ready_only_while_its_readyz_says_so(scenario, rendered):
    http = (ROOT / "services" / "collector" / "src" / "cdp_collector" / "http.py").read_text()
    assert 'add_get("/readyz"' in http
    r = rendered[scenario]
    (w,) = [w for w in r.component_workloads() if component_of_workload(w) == "collector"]
    (c,) = w["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    (port,) = [p for p in c["ports"] if p["name"] == "http"]
    assert env_of(c)["CDP_HTTP_PORT"]["value"] == str(port["containerPort"])
    # Start-up and liveness stay on gRPC health: a NATS outage must not restart the collector.
    assert "grpc" in c["startupProbe"] and "grpc" in c["livenessProbe"]


def test_an_http_readiness_probe_needs_an_http_port():
    refused = render({"components": {"identity": {"probes": {"readiness": {"httpPath": "/readyz"}}}}})
    assert isinstance(refused, str) and "probes.readiness.httpPath needs ports.http" in refused


# --- 7. what the provisioning Job reads -----------------------------------------------------------------


def test_the_stream_settings_table_is_the_codes():
    from cdp_kit.streamtable import KNOBS, MODEL_STORE_VARIABLE, STREAMS

    readers = {
        k.variable: sorted({e.owner for e in STREAMS if e.build({}) != e.build({k.variable: "1"})}) for k in KNOBS
    }
    readers[MODEL_STORE_VARIABLE] = ["scoring"]  # scoring's model store (streamtable.model_bucket)
    on_disk = json.loads((CHART / "files" / "stream-settings.json").read_text())
    assert on_disk == readers, f"deploy/helm/cdp/files/stream-settings.json is stale; it should be:\n{readers}"


@pytest.mark.parametrize("scenario", ["prod", "secure", "everything"])
def test_the_provisioning_job_reads_only_stream_settings_from_the_components_secrets(scenario, rendered):
    r = rendered[scenario]
    shaping = set(json.loads((CHART / "files" / "stream-settings.json").read_text()))
    (job,) = r.of_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container, "a whole Secret: SMTP, Twilio and CRM credentials"
    component_secrets = {s["name"] for c in components(r).values() for s in c.get("envFromSecrets") or []}
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] in component_secrets:
            assert entry["name"] in shaping and ref["key"] == entry["name"] and ref["optional"] is True, entry
    read = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    # Each setting from the Secret of the component that reads it (prod: orchestration's and crm's).
    assert read["CDP_ORCHESTRATION_RETENTION_DAYS"]["name"] == "cdp-orchestration-channels"
    assert read["CDP_CRM_RETENTION_DAYS"]["name"] == "cdp-crm-credentials"
    assert "CDP_EVENTS_RETENTION_DAYS" not in read, "no reader of it has a Secret"


# --- 8. identity's standby -------------------------------------------------------------------------------


def test_identity_with_a_standby_updates_on_delete_and_the_others_roll(rendered):
    # A standby is never ready: a RollingUpdate (and helm's --wait on it) would wait for it for ever.
    prod = rendered["prod"].get("StatefulSet", f"{RELEASE}-identity")
    assert prod["spec"]["replicas"] > 1 and prod["spec"]["updateStrategy"] == {"type": "OnDelete"}
    for scenario in ("default", "dev", "prod"):
        for sts in rendered[scenario].of_kind("StatefulSet"):
            if sts is prod:
                continue
            assert sts["spec"].get("updateStrategy", {"type": "RollingUpdate"})["type"] == "RollingUpdate", (
                scenario,
                sts["metadata"]["name"],
            )
    readme = README.read_text()
    assert "### Updating identity" in readme and "kubectl -n cdp delete pod" in readme


def test_skaffold_prod_leaves_the_wait_to_helm_which_passes_on_delete_statefulsets(rendered):
    # skaffold's status check runs `kubectl rollout status`, which refuses an OnDelete StatefulSet;
    # Helm's waiters (pkg/kube/ready.go, kstatus) count one as ready.
    from test_skaffold import SKAFFOLD, resolved

    config = yaml.safe_load(SKAFFOLD.read_text())
    on_delete = [
        s
        for s in rendered["prod"].of_kind("StatefulSet")
        if s["spec"].get("updateStrategy", {}).get("type") == "OnDelete"
    ]
    assert on_delete
    prod = resolved(config, "prod")["deploy"]
    assert prod.get("statusCheck") is False
    assert prod["helm"]["releases"][0]["wait"] is True
    assert resolved(config, "dev")["deploy"].get("statusCheck", True) is True


# --- 9. replica counts the chart refuses ----------------------------------------------------------------


REFUSED = {
    "replicas for everyone reach identity": (
        {"components": {"identity": {"replicas": 2}}},
        'component "identity": 2 replicas with ownership=static',
    ),
    "componentDefaults.replicas on the default values": (
        {"componentDefaults": {"replicas": 2}},
        "ownership=static",
    ),
    "a per-pod store with static ownership and a count that may change": (
        {"components": {"profile": {"replicas": 3}}},
        "components.profile.acknowledgeFixedReplicas",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_replica_counts_that_would_lose_or_never_serve_state_are_refused(case):
    values, message = REFUSED[case]
    refused = render(values)
    assert isinstance(refused, str), f"{case}: rendered"
    assert message in refused, refused


def test_a_fixed_count_on_per_pod_stores_renders_when_acknowledged(rendered):
    r = render({"components": {"profile": {"replicas": 3, "acknowledgeFixedReplicas": True}}})
    assert isinstance(r, Rendered), r
    (c,) = r.get("StatefulSet", f"{RELEASE}-profile")["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["CDP_REPLICAS"]["value"] == "3"
    # On a shared store (prod) or with leases nothing needs acknowledging.
    assert isinstance(render({"componentDefaults": {"replicas": 3}}, PROD), Rendered)


# --- 10. the README examples pods start from -------------------------------------------------------------


def test_the_service_tokens_example_has_a_key_for_every_caller(rendered):
    text = README.read_text()
    block = text[text.index("create secret generic cdp-service-tokens") :].split("\n#", 1)[0]
    keys = set(re.findall(r"--from-literal=([\w-]+)=", block))
    callers = {name for name, c in components(rendered["prod"]).items() if c.get("calls")}
    assert keys == callers, "a caller without its key has no token file: its pods do not start"


def test_the_token_scopes_example_is_what_each_caller_needs():
    from cdpctl.platform import SERVICES, service_scopes

    text = README.read_text()
    start = text.index("# digests in tokens.json")
    lines = text[start:].splitlines()[1:]
    listed = {}
    for line in lines:  # the header's own lines, then one `#   <caller>: <scopes>` line per caller
        match = re.fullmatch(r"#\s+([\w-]+): ([\w:]+(?: [\w:]+)*)", line.strip())
        if match:
            listed[match.group(1)] = set(match.group(2).split())
        elif listed:
            break
    needed = {svc.name: set(service_scopes(svc)) for svc in SERVICES if svc.calls}
    assert listed == needed


def test_the_readme_does_not_deny_what_cdp_kit_does():
    from cdp_kit.settings import ServiceSettings

    assert "health_port" in {f.name for f in ServiceSettings.__dataclass_fields__.values()}
    text = README.read_text()
    assert "does not do this yet" not in text
    # GitOps and `helm template` renders have no `lookup`: the hash key must be the operator's Secret.
    assert "privacyHashKey.existingSecret" in text


def test_the_readme_scales_through_the_chart_when_nats_users_are_on():
    # natsAuth grants consumer names per replica: a pod past the rendered count has no permission.
    text = README.read_text()
    scaling = text[text.index("## Scaling") : text.index("## Validation")]
    for bullet in scaling.split("\n- "):
        if "kubectl -n cdp scale" in bullet and "never `kubectl scale`" not in bullet:
            assert "natsAuth" in bullet and "helm upgrade" in bullet, bullet
