"""The Helm chart, rendered by Helm's own engine and checked object by object.

What a cluster would refuse (schemas), what deploy/README.md promises (hardened pods, gRPC probes,
PDBs, resource requests) and what the services rely on (every variable set, every file mounted).
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_support import CHART, KUBE_VERSIONS, RELEASE, SCENARIOS, Rendered, request

ALL = list(SCENARIOS)
# Objects whose schemas kubernetes-validate cannot know: CRDs of other projects.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Variables every service pod gets, whatever the values (cdp_kit.settings reads them all).
ALWAYS_SET = {
    "OTEL_SERVICE_NAME",
    "CDP_NATS_URL",
    "CDP_GRPC_PORT",
    "CDP_METRICS_PORT",
    "CDP_STORE_URL",
    "CDP_PARTITIONS",
    "CDP_LOG_LEVEL",
    "CDP_LOG_FORMAT",
    "CDP_AUTH_MODE",
    "CDP_SHUTDOWN_GRACE",
}
WRITABLE_PATHS = {"/tmp", "/var/lib/cdp"}
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")


def pod_specs(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, w["spec"]["template"]["spec"]) for w in r.workloads()]


def component_containers(r: Rendered):
    for w in r.component_workloads():
        spec = w["spec"]["template"]["spec"]
        for container in spec["containers"]:
            yield w, spec, container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def component_of(o: dict[str, Any]) -> str:
    return o["metadata"]["labels"]["app.kubernetes.io/component"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- Helm itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "dev", "prod"])
def test_helm_lint_is_clean(scenario, helm_batch):
    (result,) = helm_batch([request("lint", SCENARIOS[scenario] | {"strict": True})])
    assert result["ok"], result
    report = result["lint"]
    # Linting offline cannot fetch the nats chart; Helm reports a declared dependency missing from
    # charts/ even while it is disabled. That one finding is expected here and nothing else is.
    unexpected = [e for e in report["errors"] if "missing these dependencies: nats" not in e]
    assert not unexpected, report["messages"]
    warnings = [m for m in report["messages"] if m["severity"] >= 2 and "dependencies: nats" not in m["error"]]
    assert not warnings, warnings


@pytest.mark.parametrize("scenario", ALL)
def test_every_object_passes_kubernetes_strict_schema(scenario, rendered):
    r = rendered[scenario]
    assert r.objects, f"{scenario} rendered nothing"
    problems = []
    for o in r.objects:
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{r.describe(o)} on {version}: {exc.message} at {list(exc.path)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario", ALL)
def test_names_are_unique_and_labelled(scenario, rendered):
    r = rendered[scenario]
    seen = set()
    for o in r.objects:
        key = (o["kind"], o["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "cdp"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "cdp"
        for key, value in labels.items():
            assert LABEL_VALUE.fullmatch(value), f"{r.describe(o)}: label {key}={value!r} is not a valid label value"
        assert "namespace" not in o["metadata"], "the release namespace comes from helm, not the templates"


# --- pods: deploy/README.md, what the chart expects of a service ------------------------------------------


@pytest.mark.parametrize("scenario", ALL)
def test_every_pod_is_hardened(scenario, rendered):
    for w, spec in pod_specs(rendered[scenario]):
        name = Rendered.describe(w)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        # Only pods that hold Kubernetes Leases talk to the API server, so only they get a token.
        leases = rendered[scenario].component(w).get("ownership") == "kubernetes"
        assert spec["automountServiceAccountToken"] is leases, name
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), f"{name}: {forbidden}"
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name


@pytest.mark.parametrize("scenario", ALL)
def test_services_run_as_the_image_user_and_write_only_tmp_and_data(scenario, rendered):
    for w, spec, c in component_containers(rendered[scenario]):
        assert spec["securityContext"]["runAsUser"] == 10001
        assert c["securityContext"]["runAsUser"] == 10001
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable == WRITABLE_PATHS, f"{Rendered.describe(w)} writes to {writable}"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"]["emptyDir"]["sizeLimit"]


def http_readiness(r: Rendered, w: dict[str, Any]) -> bool:
    """Whether the component's readiness is an HTTP GET (the collector's /readyz) instead of gRPC health."""
    probes = r.component(w).get("probes") or {}
    return bool((probes.get("readiness") or {}).get("httpPath"))


@pytest.mark.parametrize("scenario", ALL)
def test_every_service_has_builtin_grpc_probes_on_a_declared_port(scenario, rendered):
    r = rendered[scenario]
    for w, spec, c in component_containers(r):
        ports = {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe == "readinessProbe" and http_readiness(r, w):
                # Readiness that knows more than gRPC health (test_chart_review): a named, declared port.
                assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"httpGet"}
                assert c[probe]["httpGet"]["port"] in {p["name"] for p in c["ports"]}
                continue
            assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (
                f"{w['metadata']['name']} {probe}"
            )
            assert c[probe]["grpc"]["port"] in ports, f"{w['metadata']['name']} {probe} targets an undeclared port"


@pytest.mark.parametrize("scenario", ALL)
def test_identity_is_ready_only_as_the_writer_and_alive_either_way(scenario, rendered):
    # Identity's standbys refuse API calls: readiness asks for IdentityService (NOT_SERVING on a
    # standby), liveness for the process; no other component narrows its readiness.
    for w, spec, c in component_containers(rendered[scenario]):
        liveness = c["livenessProbe"]["grpc"]
        assert "service" not in liveness
        if http_readiness(rendered[scenario], w):
            continue
        readiness = c["readinessProbe"]["grpc"]
        if w["metadata"]["name"].endswith("identity"):
            assert readiness["service"] == "cdp.identity.v1.IdentityService"
        else:
            assert "service" not in readiness, w["metadata"]["name"]


def test_probes_use_the_plaintext_health_port_when_tls_is_on(rendered):
    for w, spec, c in component_containers(rendered["prod"]):
        env = env_of(c)
        assert "CDP_TLS_CERT_FILE" in env
        health = int(env["CDP_HEALTH_PORT"]["value"])
        assert health != int(env["CDP_GRPC_PORT"]["value"])
        probes = ("startupProbe", "livenessProbe", "readinessProbe")
        assert {c[p]["grpc"]["port"] for p in probes if "grpc" in c[p]} == {health}


@pytest.mark.parametrize("scenario", ALL)
def test_every_container_requests_resources_and_caps_memory(scenario, rendered):
    for w, spec in pod_specs(rendered[scenario]):
        for c in spec["containers"]:
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], Rendered.describe(w)
            assert resources["limits"]["memory"], Rendered.describe(w)


def test_graceful_shutdown_fits_in_the_termination_grace_period(rendered):
    for w, spec, c in component_containers(rendered["default"]):
        grace = int(env_of(c)["CDP_SHUTDOWN_GRACE"]["value"])
        assert spec["terminationGracePeriodSeconds"] > grace


# --- environment and the files it points at -----------------------------------------------------------


@pytest.mark.parametrize("scenario", ALL)
def test_otel_service_name_is_the_component_name_everywhere(scenario, rendered):
    for w, spec, c in component_containers(rendered[scenario]):
        component = component_of(w)
        assert env_of(c)["OTEL_SERVICE_NAME"]["value"] == component
        assert c["name"] == component
        assert w["metadata"]["name"] == f"{RELEASE}-{component}"
        assert spec["serviceAccountName"] == f"{RELEASE}-{component}"
        module = (
            rendered[scenario].values["components"][component].get("module") or f"cdp_{component.replace('-', '_')}"
        )
        assert c["command"] == ["python", "-m", module]


@pytest.mark.parametrize("scenario", ALL)
def test_every_variable_is_set_and_none_is_empty(scenario, rendered):
    r = rendered[scenario]
    for w, spec, c in component_containers(r):
        env = env_of(c)
        assert len(env) == len(c["env"]), f"{Rendered.describe(w)}: a variable is set twice"
        missing = ALWAYS_SET - set(env)
        assert not missing, f"{Rendered.describe(w)} lacks {missing}"
        for name, entry in env.items():
            if "valueFrom" in entry:
                assert entry["valueFrom"], name
            else:
                assert str(entry.get("value", "")).strip(), f"{Rendered.describe(w)}: {name} is empty"
        if env["CDP_AUTH_MODE"]["value"] == "tokens":
            assert "CDP_AUTH_TOKENS_FILE" in env
        # Every port the pod declares is the one the service was told to listen on, and vice versa
        # (the http port in the variable the component names: the CRM connector's webhook port).
        component = r.values["components"].get(component_of(w)) or {}
        http_variable = component.get("httpPortVariable") or r.values["componentDefaults"]["httpPortVariable"]
        for p in c["ports"]:
            variable = {
                "grpc": "CDP_GRPC_PORT",
                "http": http_variable,
                "metrics": "CDP_METRICS_PORT",
                "health": "CDP_HEALTH_PORT",
            }[p["name"]]
            assert env[variable]["value"] == str(p["containerPort"])


def secret_keys(r: Rendered, name: str) -> set[str] | None:
    """Keys of a Secret the chart renders; None when it is an existing Secret named in values."""
    for o in r.of_kind("Secret"):
        if o["metadata"]["name"] == name:
            return set(o.get("stringData", {})) | set(o.get("data", {}))
    return None


def existing_secrets(values: dict[str, Any]) -> set[str]:
    return {
        s
        for s in (
            values["auth"].get("existingSecret"),
            values["tls"].get("existingSecret"),
            values["sources"].get("existingSecret"),
            values["crmConnections"].get("existingSecret"),
            values["global"]["mongodbUri"].get("existingSecret"),
            values["natsAuth"]["tls"].get("existingSecret"),
            values["serviceTokens"].get("existingSecret"),
        )
        if s
    }


@pytest.mark.parametrize("scenario", ALL)
def test_every_file_variable_points_into_a_mounted_secret_key(scenario, rendered):
    r = rendered[scenario]
    existing = existing_secrets(r.values)
    for w, spec, c in component_containers(r):
        env = env_of(c)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name, entry in env.items():
            if not name.endswith("_FILE"):
                continue
            directory, filename = posixpath.split(entry["value"])
            assert directory in mounts, f"{Rendered.describe(w)}: {name}={entry['value']} is not under a mount"
            assert mounts[directory].get("readOnly") is True, f"{name} is mounted writable"
            secret = volumes[mounts[directory]["name"]]["secret"]
            (item,) = [i for i in secret["items"] if i["path"] == filename]
            keys = secret_keys(r, secret["secretName"])
            if keys is None:
                assert secret["secretName"] in existing, (
                    f"{name}: Secret {secret['secretName']} is neither rendered nor named in values"
                )
            else:
                assert item["key"] in keys, f"{name}: Secret {secret['secretName']} has no key {item['key']}"


@pytest.mark.parametrize("scenario", ALL)
def test_secret_key_refs_name_a_known_secret(scenario, rendered):
    r = rendered[scenario]
    known = existing_secrets(r.values) | {s["metadata"]["name"] for s in r.of_kind("Secret")}
    extra = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for comp in r.values["components"].values()
        for e in comp.get("extraEnv", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for w, spec, c in component_containers(r):
        for entry in c["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in known | extra, f"{entry['name']} reads unknown Secret {ref['name']}"


def test_inline_files_reach_their_secret_verbatim(rendered):
    r = rendered["everything"]
    auth = r.get("Secret", f"{RELEASE}-auth-tokens")["stringData"][r.values["auth"]["key"]]
    assert json.loads(auth) == {"tokens": r.values["auth"]["tokens"]}
    sources = r.get("Secret", f"{RELEASE}-sources")["stringData"][r.values["sources"]["key"]]
    assert json.loads(sources) == r.values["sources"]["inline"]


def test_image_reference_keeps_skaffolds_digest(rendered):
    r = rendered["everything"]
    image = r.values["image"]
    for w, spec, c in component_containers(r):
        assert c["image"] == f"{image['repository']}:{image['tag']}"
        assert w["metadata"]["labels"]["app.kubernetes.io/version"] == image["tag"].split("@")[0]


def test_dev_keeps_sqlite_on_the_data_volume_and_uses_the_in_release_nats(rendered):
    for w, spec, c in component_containers(rendered["dev"]):
        env = env_of(c)
        component = component_of(w)
        assert env["CDP_STORE_URL"]["value"] == f"sqlite:////var/lib/cdp/{component}.db"
        assert env["CDP_NATS_URL"]["value"] == f"nats://{RELEASE}-nats:4222"
        assert env["CDP_AUTH_MODE"]["value"] == "none"
        assert "CDP_AUTH_TOKENS_FILE" not in env


def test_prod_reads_the_mongodb_uri_from_a_secret_and_turns_tls_and_tokens_on(rendered):
    values = rendered["prod"].values
    for w, spec, c in component_containers(rendered["prod"]):
        env = env_of(c)
        assert env["CDP_STORE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": values["global"]["mongodbUri"]["existingSecret"],
            "key": values["global"]["mongodbUri"]["key"],
        }
        assert env["CDP_AUTH_MODE"]["value"] == "tokens"
        assert {"CDP_TLS_CERT_FILE", "CDP_TLS_KEY_FILE", "CDP_TLS_CLIENT_CA_FILE"} <= set(env)


# --- availability --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["prod", "prod+newcomer"])
def test_prod_runs_two_or_more_pods_per_component_behind_a_pdb(scenario, rendered):
    r = rendered[scenario]
    pdbs = r.of_kind("PodDisruptionBudget")
    for w in r.component_workloads():
        assert w["spec"]["replicas"] >= 2, Rendered.describe(w)
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if matches(p["spec"]["selector"]["matchLabels"], pod_labels)]
        if w["metadata"]["name"] == "cdp-identity":
            # One writer and a standby that is alive but never ready: a PDB would count the standby as
            # disrupted and refuse every eviction of the writer, whose eviction hands over at once.
            assert covering == [], "identity's standby would block draining the writer's node"
            continue
        assert len(covering) == 1, f"{Rendered.describe(w)} is covered by {len(covering)} PDBs"
        assert covering[0]["spec"].get("maxUnavailable", 0) < w["spec"]["replicas"]


@pytest.mark.parametrize("scenario", ALL)
def test_selectors_pick_exactly_their_own_pods(scenario, rendered):
    r = rendered[scenario]
    workloads = r.workloads()
    for w in workloads:
        assert matches(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
    for selecting in r.of_kind("Service") + r.of_kind("PodDisruptionBudget"):
        selector = selecting["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        targets = [w for w in workloads if matches(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"{Rendered.describe(selecting)} selects {[Rendered.describe(t) for t in targets]}"
        if selecting["kind"] == "Service":
            container_ports = {p["name"] for p in targets[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert {p["targetPort"] for p in selecting["spec"]["ports"]} <= container_ports


def test_a_config_change_in_values_rolls_the_pods_that_read_it(helm_batch):
    def sources(key):
        return {"inline": {"sources": [{"id": "web", "write_key": key}]}}

    def tokens(digest):
        return [{"name": "crm-sync", "sha256": digest, "scopes": ["collector:write"]}]

    base = {"sources": sources("wk_first_key"), "auth": {"tokens": tokens("ab" * 32)}}
    scenarios = [
        base,
        base | {"sources": sources("wk_second_key")},
        base | {"auth": {"tokens": tokens("cd" * 32)}},
        base | {"componentDefaults": {"log": {"level": "DEBUG"}}},
    ]
    results = helm_batch([request("template", {"set_values": s}) for s in scenarios])

    def checksum(result):
        (deployment,) = [d for d in yaml.safe_load_all(result["manifest"]) if d and d["kind"] == "Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    first, new_sources, new_tokens, new_log_level = (checksum(r) for r in results)
    assert first != new_sources, "new sources must roll the collector"
    assert first != new_tokens, "new inline tokens must roll the pods"
    # Plain settings live in the pod spec itself, so they roll pods without the checksum's help.
    assert first == new_log_level


def test_existing_secrets_are_not_checksummed(rendered):
    # Their content is invisible to helm; the services re-read those files when they change.
    for w, spec, c in component_containers(rendered["prod"]):
        assert "checksum/config" not in w["spec"]["template"]["metadata"].get("annotations", {})


# --- growing the platform ------------------------------------------------------------------------------


def test_adding_a_component_is_a_values_only_change(rendered):
    before, after = rendered["prod"], rendered["prod+newcomer"]
    new = {Rendered.describe(o) for o in after.objects} - {Rendered.describe(o) for o in before.objects}
    assert new == {
        "ServiceAccount/cdp-newcomer",
        "Service/cdp-newcomer",
        "Deployment/cdp-newcomer",
        "PodDisruptionBudget/cdp-newcomer",
        "NetworkPolicy/cdp-newcomer",
        "Secret/cdp-newcomer-nats",  # its NATS user (natsAuth), which may do nothing until it has a role
    }
    (container,) = after.get("Deployment", "cdp-newcomer")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "cdp_newcomer"]
    assert env_of(container)["OTEL_SERVICE_NAME"]["value"] == "newcomer"
    assert after.get("Deployment", "cdp-newcomer")["spec"]["replicas"] == before.values["componentDefaults"]["replicas"]


def test_a_stateful_component_gets_ordinals_and_a_claim_per_pod(rendered):
    r = rendered["stateful"]
    assert not [d for d in r.of_kind("Deployment") if d["metadata"]["name"] == "cdp-profile"]
    sts = r.get("StatefulSet", "cdp-profile")
    assert sts["spec"]["replicas"] == 3
    headless = r.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    spec = sts["spec"]["template"]["spec"]
    assert "data" not in {v["name"] for v in spec["volumes"]}, "the claim template provides the data volume"
    env = env_of(spec["containers"][0])
    assert (
        env["CDP_POD_ORDINAL"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert env["CDP_REPLICAS"]["value"] == "3"


def test_optional_objects_render_behind_their_switches(rendered):
    everything, default = rendered["everything"], rendered["default"]
    for kind in (
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "NetworkPolicy",
        "PersistentVolumeClaim",
    ):
        assert everything.of_kind(kind), kind
        assert not default.of_kind(kind), f"{kind} is on by default"
    # StatefulSets only for components that own partitions (identity), never as a side effect.
    stateful = {n for n, c in default.values["components"].items() if c.get("stateful") and c.get("enabled", True)}
    assert {Rendered.describe(o) for o in default.of_kind("StatefulSet")} == {f"StatefulSet/cdp-{n}" for n in stateful}
    hpa = everything.get("HorizontalPodAutoscaler", "cdp-collector")
    assert "replicas" not in everything.get("Deployment", "cdp-collector")["spec"], "the HPA owns replicas"
    assert hpa["spec"]["minReplicas"] == 3
    mongo = everything.get("StatefulSet", "cdp-mongodb")
    url = env_of(everything.get("Deployment", "cdp-collector")["spec"]["template"]["spec"]["containers"][0])[
        "CDP_STORE_URL"
    ]
    assert url["value"] == "mongodb://cdp-mongodb:27017/cdp"
    assert mongo["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 27017
    monitors = {m["metadata"]["name"] for m in everything.of_kind("ServiceMonitor")}
    assert monitors == {
        f"cdp-{name}"
        for name in ("collector", "identity", "profile", "scoring", "segmentation", "orchestration", "crm")
    }


# --- values that must not install ----------------------------------------------------------------------

BAD_VALUES = {
    "replicas is a number": (
        {"components": {"collector": {"replicas": "two"}}},
        "at '/components/collector/replicas': got string, want integer",
    ),
    "typo in a component key": (
        {"components": {"collector": {"replica": 2}}},
        "additional properties 'replica' not allowed",
    ),
    "component name is a DNS label": (
        {"components": {"Identity_Service": {}}},
        "Identity_Service",
    ),
    "log level from the list": (
        {"componentDefaults": {"log": {"level": "VERBOSE"}}},
        "/componentDefaults/log/level",
    ),
    "auth mode from the list": ({"auth": {"mode": "open"}}, "/auth/mode"),
    "write keys are long enough": (
        {"sources": {"inline": {"sources": [{"id": "web", "write_key": "short"}]}}},
        "/sources/inline/sources/0/write_key",
    ),
    "tokens hold digests, not tokens": (
        {"auth": {"tokens": [{"name": "a", "sha256": "cdp_secret-token", "scopes": ["*"]}]}},
        "/auth/tokens/0/sha256",
    ),
    "tls needs a secret": ({"tls": {"enabled": True}}, "tls.enabled=true needs tls.existingSecret"),
    "tls needs a plaintext probe port": (
        {"tls": {"enabled": True, "existingSecret": "cdp-tls"}},
        "Kubelet gRPC probes cannot speak TLS",
    ),
    "mongodb store needs a uri": (
        {"componentDefaults": {"store": {"kind": "mongodb"}}},
        "store.kind=mongodb needs global.mongodbUri.existingSecret",
    ),
    "servicemonitor needs the crd": (
        {"serviceMonitor": {"enabled": True}},
        "does not serve monitoring.coreos.com/v1",
    ),
    "calls name a component": (
        {"components": {"profile": {"calls": ["identiti"]}}},
        'components.profile.calls: no component named "identiti"',
    ),
    "calls need the callee enabled": (
        {"components": {"identity": {"enabled": False}}},
        'components.profile.calls: "identity" is disabled',
    ),
    "env cannot shadow calls": (
        {"components": {"profile": {"env": {"CDP_IDENTITY_ADDRESS": "x:1"}}}},
        "CDP_IDENTITY_ADDRESS is set by calls: [identity]",
    ),
    "env cannot shadow chart variables": (
        {"components": {"collector": {"env": {"CDP_LOG_LEVEL": "DEBUG"}}}},
        "components.collector.env.CDP_LOG_LEVEL: the chart sets CDP_LOG_LEVEL itself",
    ),
    "env values are not empty": (
        {"components": {"collector": {"env": {"CDP_X": ""}}}},
        "/components/collector/env/CDP_X",
    ),
    "pdb that blocks drains": (
        {"componentDefaults": {"pdb": {"enabled": True, "minAvailable": 1}}},
        "pdb.minAvailable=1 with 1 replicas would block every node drain",
    ),
    "shared read-write-once claim": (
        {"components": {"collector": {"replicas": 2, "persistence": {"enabled": True}}}},
        "2 replicas would share one ReadWriteOnce claim",
    ),
    "stateful components do not autoscale": (
        {"components": {"profile": {"stateful": True, "autoscaling": {"enabled": True}}}},
        "need a fixed replica count",
    ),
    "ownership from the list": (
        {"components": {"identity": {"ownership": "zookeeper"}}},
        "/components/identity/ownership",
    ),
    "leases are for partition owners": (
        {"components": {"collector": {"ownership": "kubernetes"}}},
        "ownership=kubernetes needs stateful: true",
    ),
    "leases need a store every pod shares": (
        {"components": {"profile": {"ownership": "nats"}}},
        "store.kind=sqlite gives each pod a store of its own",
    ),
    "port clash": (
        {"components": {"collector": {"ports": {"http": 50051}}}},
        "ports.http and ports.grpc are both 50051",
    ),
    "component names that the dependencies use": (
        {"nats": {"enabled": True}, "components": {"nats": {}}},
        'component "nats" would collide',
    ),
    "emulators are never deployed": (
        {"components": {"crm": {"enabled": True, "module": "cdp_crm_emulators"}}},
        "module cdp_crm_emulators is development and test code",
    ),
    "one source for the CRM connections": (
        {
            "crmConnections": {
                "existingSecret": "cdp-crm-connections",
                "inline": {"connections": [{"id": "hs", "kind": "hubspot"}]},
            }
        },
        "crmConnections.existingSecret and crmConnections.inline.connections are both set",
    ),
    "the connections file is the chart's": (
        {"components": {"crm": {"env": {"CDP_CRM_CONNECTIONS_FILE": "/tmp/c.yaml"}}}},
        "the chart sets CDP_CRM_CONNECTIONS_FILE itself",
    ),
    "local channel servers are never deployed": (
        {"components": {"channels": {"module": "cdp_testing.channels"}}},
        "module cdp_testing.channels is development and test code",
    ),
    "secret files get a folder of their own": (
        {
            "components": {
                "orchestration": {"secretFiles": [{"volume": "k", "secret": "s", "mountPath": "/etc/cdp/auth"}]}
            }
        },
        "secretFiles mountPath /etc/cdp/auth is taken",
    ),
    "secret files live under /etc/cdp": (
        {
            "components": {
                "orchestration": {"secretFiles": [{"volume": "k", "secret": "s", "mountPath": "/var/lib/cdp"}]}
            }
        },
        "/components/orchestration/secretFiles/0/mountPath",
    ),
    "unknown top-level key": (
        {"componentDefault": {}},
        "additional properties 'componentDefault' not allowed",
    ),
}


@pytest.fixture(scope="module")
def bad_value_results(helm_batch):
    cases = list(BAD_VALUES)
    results = helm_batch([request("template", {"set_values": BAD_VALUES[c][0]}) for c in cases])
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_with_a_message_naming_the_problem(case, bad_value_results):
    result = bad_value_results[case]
    _, expected = BAD_VALUES[case]
    assert not result["ok"], f"{case}: rendered although it should not"
    assert expected in result["error"], result["error"]


def test_the_schema_covers_every_default_key():
    """values.yaml and values.schema.json must not drift: each default key is declared in the schema."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node):
        while "$ref" in node or "allOf" in node:
            if "$ref" in node:
                node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
            else:
                node = resolve(node["allOf"][0])
        return node

    def walk(value, node, path):
        node = resolve(node)
        if not isinstance(value, dict) or node.get("additionalProperties", True) is not False:
            return
        for key, sub in value.items():
            assert key in node.get("properties", {}), f"values.yaml key {path}{key} is not in values.schema.json"
            walk(sub, node["properties"][key], f"{path}{key}.")

    walk(values, schema, "")
    walk(values["componentDefaults"], schema["definitions"]["component"], "componentDefaults.")
    for name, component in values["components"].items():
        walk(component, schema["definitions"]["component"], f"components.{name}.")


def test_identity_owns_partitions_with_stable_ordinals(rendered):
    # Static (one replica by default) knows its ordinal and the replica count; prod's two replicas are a
    # writer and a standby under a Kubernetes Lease (static with two replicas refuses to start).
    identity = rendered["default"].get("StatefulSet", "cdp-identity")
    (container,) = identity["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "cdp_identity"]
    env = env_of(container)
    assert {"CDP_POD_ORDINAL", "CDP_REPLICAS"} <= set(env), "identity must know which partitions it owns"
    assert identity["spec"]["replicas"] == 1 or env.get("CDP_OWNERSHIP", {}).get("value", "static") != "static"
    identity = rendered["prod"].get("StatefulSet", "cdp-identity")
    (container,) = identity["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert identity["spec"]["replicas"] >= 2
    assert env["CDP_OWNERSHIP"]["value"] == "kubernetes"
    assert "CDP_REPLICAS" not in env


def test_lease_ownership_grants_its_pods_the_lease_verbs_and_nothing_else(rendered):
    r = rendered["leases"]
    role = r.get("Role", "cdp-identity-leases")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update", "delete"],
        }
    ]
    binding = r.get("RoleBinding", "cdp-identity-leases")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "cdp-identity-leases",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cdp-identity", "namespace": "cdp"}]
    assert r.get("ServiceAccount", "cdp-identity")["automountServiceAccountToken"] is True
    (container,) = r.get("StatefulSet", "cdp-identity")["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["CDP_OWNERSHIP"]["value"] == "kubernetes"
    assert env["CDP_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["CDP_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The split follows the live pods: nothing may read the replica count the chart was rendered with,
    # which `kubectl scale` makes wrong.
    assert "CDP_REPLICAS" not in env
    # NATS leases need no API access: no Role, no token.
    (container,) = r.get("StatefulSet", "cdp-profile")["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["CDP_OWNERSHIP"]["value"] == "nats"
    assert "CDP_POD_NAMESPACE" not in env_of(container)
    assert {Rendered.describe(o) for o in r.of_kind("Role") + r.of_kind("RoleBinding")} == {
        "Role/cdp-identity-leases",
        "RoleBinding/cdp-identity-leases",
    }
    # Static ownership (the default) renders no RBAC and no ownership variable.
    default = rendered["default"]
    assert not default.of_kind("Role") and not default.of_kind("RoleBinding")
    for w, spec, c in component_containers(default):
        assert "CDP_OWNERSHIP" not in env_of(c), Rendered.describe(w)


def test_identity_keeps_its_graph_on_a_volume_per_pod(rendered):
    identity = rendered["default"].get("StatefulSet", "cdp-identity")
    claims = identity["spec"].get("volumeClaimTemplates", [])
    assert claims, "an acknowledged event is never replayed: the sqlite graph must outlive the pod"


def test_profile_owns_partitions_and_finds_identity_through_calls(rendered):
    for scenario in ("default", "prod"):
        profile = rendered[scenario].get("StatefulSet", "cdp-profile")
        (container,) = profile["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", "cdp_profile"]
        env = env_of(container)
        if scenario == "default":  # static: a fixed split by ordinal
            assert {"CDP_POD_ORDINAL", "CDP_REPLICAS"} <= set(env)
        else:  # prod: Leases, so `kubectl scale statefulset cdp-profile` moves partitions
            assert env["CDP_OWNERSHIP"]["value"] == "kubernetes" and "CDP_REPLICAS" not in env
            assert rendered[scenario].get("RoleBinding", "cdp-profile-leases")
        identity = rendered[scenario].get("Service", "cdp-identity")
        (grpc_port,) = [p["port"] for p in identity["spec"]["ports"] if p["name"] == "grpc"]
        # The Service's DNS name, which TLS checks the certificate against (test_chart_review).
        assert env["CDP_IDENTITY_ADDRESS"]["value"] == f"cdp-identity.cdp.svc:{grpc_port}"
    assert rendered["default"].get("StatefulSet", "cdp-profile")["spec"].get("volumeClaimTemplates")
    (container,) = rendered["prod"].get("StatefulSet", "cdp-profile")["spec"]["template"]["spec"]["containers"]
    # The token for identity: a file from the service-tokens Secret (profile's own key only), re-read when
    # the Secret changes; never a value, never an environment variable.
    env = env_of(container)
    assert env["CDP_IDENTITY_TOKEN_FILE"]["value"] == "/etc/cdp/peer-token/token" and "CDP_IDENTITY_TOKEN" not in env
    spec = rendered["prod"].get("StatefulSet", "cdp-profile")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "peer-token"]
    assert volume["secret"]["secretName"] == "cdp-service-tokens"
    assert volume["secret"]["items"] == [{"key": "profile", "path": "token"}]


def test_every_service_calls_the_same_peers_in_the_cluster_as_under_make_up(rendered):
    # A peer only `make up` wires works on a laptop and fails in the cluster (orchestration publishing a
    # journey that reads past events needs profile): the chart's `calls` are make up's.
    from cdpctl.platform import SERVICES

    make_up = {svc.name: set(svc.calls) for svc in SERVICES}
    for scenario in ("default", "dev", "prod"):  # the values files the chart ships
        r = rendered[scenario]
        names = {component_of(w) for w in r.component_workloads()}
        chart = {}
        for w, _, container in component_containers(r):
            env = env_of(container)
            chart[component_of(w)] = {p for p in names if f"CDP_{p.upper().replace('-', '_')}_ADDRESS" in env}
        assert chart == make_up, scenario


def test_orchestration_owns_partitions_and_reads_channel_providers_from_secrets(rendered):
    for scenario in ("default", "dev", "prod"):
        r = rendered[scenario]
        sts = r.get("StatefulSet", "cdp-orchestration")
        spec = sts["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["command"] == ["python", "-m", "cdp_orchestration"]
        env = env_of(container)
        assert env["OTEL_SERVICE_NAME"]["value"] == "orchestration"
        assert "CDP_POD_ORDINAL" in env
        # No provider is configured from plain values: dev sends in-app only, prod reads Secrets.
        assert not [name for name in env if name.startswith(("CDP_SMTP_", "CDP_TWILIO_", "CDP_WEBHOOK_", "CDP_FCM_"))]
        if scenario == "prod":
            assert env["CDP_OWNERSHIP"]["value"] == "kubernetes" and "CDP_REPLICAS" not in env
            assert r.get("RoleBinding", "cdp-orchestration-leases")
            assert container["envFrom"] == [{"secretRef": {"name": "cdp-orchestration-channels", "optional": False}}]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/etc/cdp/channels"]["readOnly"] is True
            volumes = {v["name"]: v for v in spec["volumes"]}
            keys = volumes[mounts["/etc/cdp/channels"]["name"]]["secret"]
            assert keys["secretName"] == "cdp-orchestration-channel-keys" and keys["optional"] is True
        else:
            assert "envFrom" not in container
            assert sts["spec"].get("volumeClaimTemplates"), "the sqlite store must outlive the pod"


def test_crm_runs_by_default_like_the_other_partition_owners_with_its_connections_from_a_secret(rendered):
    for scenario in ("default", "dev", "prod", "crm-inline"):
        r = rendered[scenario]
        sts = r.get("StatefulSet", "cdp-crm")
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", "cdp_crm"], scenario
        env = env_of(container)
        # The webhook endpoint listens on the component's http port, which its Service exposes.
        assert env["CDP_CRM_WEBHOOK_PORT"]["value"] == "8090" and "CDP_HTTP_PORT" not in env, scenario
        service = r.get("Service", "cdp-crm")
        assert {"name": "http", "port": 8090} in [{k: p[k] for k in ("name", "port")} for p in service["spec"]["ports"]]
        path = env["CDP_CRM_CONNECTIONS_FILE"]["value"]
        assert path == "/etc/cdp/crm/connections.yaml", scenario
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["crm-connections"]["secret"]
        if scenario == "prod":
            assert secret["secretName"] == "cdp-crm-connections"  # the operator's, never rendered
            assert not [s for s in r.of_kind("Secret") if s["metadata"]["name"] == "cdp-crm-connections"]
        else:
            document = r.get("Secret", secret["secretName"])["stringData"]["connections.yaml"]
            # JSON is YAML: the connector reads the file by its suffix.
            assert yaml.safe_load(document) == r.values["crmConnections"]["inline"], scenario
    assert yaml.safe_load(
        rendered["default"].get("Secret", "cdp-crm-connections")["stringData"]["connections.yaml"]
    ) == {"connections": []}, "no connections by default: the connector runs idle"
    inline = rendered["crm-inline"].get("StatefulSet", "cdp-crm")["spec"]["template"]
    assert "checksum/config" in inline["metadata"]["annotations"], "a new document must roll the connector"

    r = rendered["prod"]
    sts = r.get("StatefulSet", "cdp-crm")
    assert sts["spec"]["replicas"] >= 2
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["CDP_OWNERSHIP"]["value"] == "kubernetes" and r.get("RoleBinding", "cdp-crm-leases")
    assert container["envFrom"] == [{"secretRef": {"name": "cdp-crm-credentials", "optional": False}}]
    assert {container[p]["grpc"]["port"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        int(env["CDP_HEALTH_PORT"]["value"])
    }
    (pdb,) = [p for p in r.of_kind("PodDisruptionBudget") if p["metadata"]["name"] == "cdp-crm"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("scenario", ALL)
def test_no_workload_runs_development_companions_or_points_at_them(scenario, rendered):
    """The local channel servers and CRM emulators are test code: not in the image, never in a release."""
    for w, spec, c in component_containers(rendered[scenario]):
        module = c["command"][2]
        assert not module.startswith(("cdp_testing", "cdp_crm_emulators", "cdpctl")), Rendered.describe(w)
        for entry in c["env"]:
            value = str(entry.get("value", ""))
            assert "127.0.0.1" not in value and "localhost" not in value, f"{Rendered.describe(w)}: {entry['name']}"
