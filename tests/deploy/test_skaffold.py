"""skaffold.yaml, checked without skaffold: its shape against the v4beta14 schema's field names, and
everything it points at (Dockerfile, chart, values files, the Services it port-forwards) against the repo
and the rendered chart.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from chart_support import CHART, NAMESPACE, RELEASE, ROOT, request

SKAFFOLD = ROOT / "skaffold.yaml"
API_VERSION = "skaffold/v4beta14"

# Field names of the objects used here, from skaffold's published v4beta14 JSON schema (every one of
# these objects has additionalProperties: false there, so a misspelt key fails `skaffold` at start).
ALLOWED = {
    "config": {
        "apiVersion",
        "kind",
        "metadata",
        "requires",
        "build",
        "test",
        "manifests",
        "deploy",
        "portForward",
        "resourceSelector",
        "verify",
        "customActions",
        "profiles",
    },
    "build": {
        "artifacts",
        "insecureRegistries",
        "tagPolicy",
        "platforms",
        "local",
        "googleCloudBuild",
        "cluster",
    },
    "artifact": {"image", "context", "sync", "requires", "hooks", "platforms", "runtimeType", "docker"},
    "docker": {
        "dockerfile",
        "target",
        "buildArgs",
        "network",
        "addHost",
        "cacheFrom",
        "cacheTo",
        "cliFlags",
        "pullParent",
        "noCache",
        "squash",
        "secrets",
        "ssh",
    },
    "local": {"push", "tryImportMissing", "useDockerCLI", "useBuildkit", "concurrency"},
    "helm": {"concurrency", "releases", "flags", "hooks"},
    "release": {
        "name",
        "chartPath",
        "remoteChart",
        "valuesFiles",
        "namespace",
        "version",
        "setValues",
        "setValueTemplates",
        "setFiles",
        "createNamespace",
        "wait",
        "recreatePods",
        "skipBuildDependencies",
        "skipTests",
        "useHelmSecrets",
        "repo",
        "upgradeOnChange",
        "overrides",
        "packaged",
        "dependsOn",
    },
    "profile": {
        "name",
        "activation",
        "requiresAllActivations",
        "patches",
        "build",
        "test",
        "manifests",
        "deploy",
        "portForward",
        "resourceSelector",
        "verify",
        "customActions",
    },
    "activation": {"env", "kubeContext", "command"},
    "patch": {"op", "path", "from", "value"},
    "portForward": {"resourceType", "resourceName", "namespace", "port", "address", "localPort"},
}


def assert_keys(obj: dict[str, Any], kind: str, where: str) -> None:
    unknown = set(obj) - ALLOWED[kind]
    assert not unknown, f"{where}: {sorted(unknown)} not in skaffold {API_VERSION} {kind} fields"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(SKAFFOLD.read_text()) if d]
    assert len(documents) == 1, "one skaffold config"
    return documents[0]


def apply_patches(config: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON-patch subset skaffold profiles use here (add/replace); a bad path fails like skaffold would."""
    patched = copy.deepcopy(config)
    for patch in patches:
        assert patch["op"] in ("add", "replace"), f"unmodelled patch op {patch['op']}"
        *parents, last = patch["path"].lstrip("/").split("/")
        node: Any = patched
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            value = copy.deepcopy(patch["value"])
            if last == "-":  # JSON patch: add at the end
                assert patch["op"] == "add", f"{patch['path']}: '-' only with add"
                node.append(value)
            elif patch["op"] == "add":  # JSON patch: add at an index inserts
                assert 0 <= int(last) <= len(node), f"{patch['path']} is past the end"
                node.insert(int(last), value)
            else:
                node[int(last)] = value
        else:
            assert patch["op"] == "add" or last in node, f"replace of missing {patch['path']}"
            node[last] = patch["value"]
    return patched


def resolved(config: dict[str, Any], profile_name: str | None) -> dict[str, Any]:
    if profile_name is None:
        return config
    (profile,) = [p for p in config["profiles"] if p["name"] == profile_name]
    out = apply_patches(config, profile.get("patches", []))
    for section in ("build", "deploy", "manifests", "portForward"):
        if section in profile:
            out[section] = profile[section]
    return out


def test_version_and_field_names(config):
    assert config["apiVersion"] == API_VERSION
    assert config["kind"] == "Config"
    assert_keys(config, "config", "skaffold.yaml")
    assert_keys(config["build"], "build", "build")
    assert_keys(config["build"]["local"], "local", "build.local")
    for artifact in config["build"]["artifacts"]:
        assert_keys(artifact, "artifact", f"artifact {artifact['image']}")
        assert_keys(artifact["docker"], "docker", f"artifact {artifact['image']}.docker")
    assert_keys(config["deploy"]["helm"], "helm", "deploy.helm")
    for release in config["deploy"]["helm"]["releases"]:
        assert_keys(release, "release", f"release {release['name']}")
    for profile in config["profiles"]:
        assert_keys(profile, "profile", f"profile {profile['name']}")
        for activation in profile.get("activation", []):
            assert_keys(activation, "activation", f"profile {profile['name']} activation")
        for patch in profile.get("patches", []):
            assert_keys(patch, "patch", f"profile {profile['name']} patch")
        for forward in profile.get("portForward", []):
            assert_keys(forward, "portForward", f"profile {profile['name']} portForward")


def test_one_artifact_built_from_the_root_dockerfile(config):
    (artifact,) = config["build"]["artifacts"]
    assert artifact["image"] == "cdp"
    context = ROOT / artifact.get("context", ".")
    assert context.resolve() == ROOT
    assert (context / artifact["docker"].get("dockerfile", "Dockerfile")).is_file()
    assert (context / ".dockerignore").is_file()


def template_key(image: str) -> str:
    # skaffold exposes IMAGE_REPO_<image>, IMAGE_TAG_<image>, IMAGE_DIGEST_<image> with non-word characters as _.
    return "".join(ch if ch.isalnum() else "_" for ch in image)


def test_the_built_image_is_what_the_chart_deploys(config):
    (artifact,) = config["build"]["artifacts"]
    key = template_key(artifact["image"])
    (release,) = config["deploy"]["helm"]["releases"]
    templates = release["setValueTemplates"]
    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}@{{{{.IMAGE_DIGEST_{key}}}}}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted in templates:
        node = values
        for part in dotted.split("."):
            assert part in node, f"setValueTemplates sets {dotted}, which the chart does not have"
            node = node[part]


@pytest.mark.parametrize("profile", [None, "dev", "prod"])
def test_every_profile_points_at_files_that_exist(config, profile):
    effective = resolved(config, profile)
    for release in effective["deploy"]["helm"]["releases"]:
        chart = ROOT / release["chartPath"]
        assert (chart / "Chart.yaml").is_file(), f"{release['chartPath']} is not a chart"
        assert chart.resolve() == CHART.resolve()
        for path in release.get("valuesFiles", []):
            assert (ROOT / path).is_file(), f"profile {profile}: values file {path} is missing"
        # The tests render with the same release name and namespace, so resource names line up.
        assert release["name"] == RELEASE
        assert release["namespace"] == NAMESPACE


def test_profiles_pick_their_values_file(config):
    assert {p["name"] for p in config["profiles"]} >= {"dev", "prod"}
    dev = resolved(config, "dev")["deploy"]["helm"]["releases"][0]
    prod = resolved(config, "prod")["deploy"]["helm"]["releases"][0]
    assert dev["valuesFiles"] == ["deploy/helm/cdp/values-dev.yaml"]
    assert prod["valuesFiles"] == ["deploy/helm/cdp/values-prod.yaml"]
    assert "valuesFiles" not in config["deploy"]["helm"]["releases"][0], "patches must not leak into the base"
    (dev_profile,) = [p for p in config["profiles"] if p["name"] == "dev"]
    assert {"command": "dev"} in dev_profile["activation"], "`skaffold dev` should need no -p"


def test_dev_port_forwards_reach_the_collectors_ports(config, rendered):
    forwards = resolved(config, "dev")["portForward"]
    assert {f["port"] for f in forwards} >= {50051, 8080}, "collector gRPC and HTTP"
    dev = rendered["dev"]
    for forward in forwards:
        assert forward["resourceType"].lower() == "service"
        assert forward["namespace"] == NAMESPACE
        service = dev.get("Service", forward["resourceName"])
        assert forward["port"] in {p["port"] for p in service["spec"]["ports"]}, (
            f"{forward['resourceName']} has no port {forward['port']}"
        )


def test_the_training_profile_builds_the_training_target_and_scoring_runs_it(config, helm_batch):
    training = resolved(config, "training")
    base, extra = training["build"]["artifacts"]
    assert base == config["build"]["artifacts"][0], "the service image is built as before"
    assert_keys(extra, "artifact", "training artifact")
    assert_keys(extra["docker"], "docker", "training artifact.docker")
    assert extra["docker"]["target"] == "training"
    assert f"FROM base AS {extra['docker']['target']}" in (ROOT / extra["docker"]["dockerfile"]).read_text()
    key = template_key(extra["image"])
    (release,) = training["deploy"]["helm"]["releases"]
    templates = release["setValueTemplates"]
    assert templates["image.trainingRepository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
    assert templates["image.trainingTag"] == f"{{{{.IMAGE_TAG_{key}}}}}@{{{{.IMAGE_DIGEST_{key}}}}}"
    assert release["setValues"] == {"components.scoring.training.enabled": True}
    assert "setValues" not in config["deploy"]["helm"]["releases"][0], "patches must not leak into the base"
    # The chart renders it as skaffold would set it: scoring on the training image, the others on cdp.
    digest = "sha256:" + "c" * 64
    dotted = {
        "image.repository": "registry.example.com/cdp",
        "image.tag": "abc123@sha256:" + "a" * 64,
        "image.trainingRepository": "registry.example.com/cdp_training",
        "image.trainingTag": f"abc123@{digest}",
        **release["setValues"],
    }
    values: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (render,) = helm_batch([request("template", {"set_values": values})])
    assert render["ok"], render.get("error")
    images = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: c["image"]
        for o in yaml.safe_load_all(render["manifest"])
        if o and o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images.pop("scoring") == f"registry.example.com/cdp_training:abc123@{digest}"
    assert set(images.values()) == {"registry.example.com/cdp:abc123@sha256:" + "a" * 64}


def test_dev_port_forwards_every_service_on_its_make_up_port(config):
    from cdpctl.platform import SERVICES

    forwards = {f["resourceName"]: f["localPort"] for f in resolved(config, "dev")["portForward"] if f["port"] != 8080}
    assert forwards == {f"{RELEASE}-{s.name}": s.grpc_port for s in SERVICES}
