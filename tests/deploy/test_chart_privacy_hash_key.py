"""The identifier hash key of deletion notices in the chart: one Secret, made once and kept across upgrades
(`lookup`, answered offline here with what the cluster's Secret would hold), mounted into profile and the
collector only, each told where it is (CDP_PRIVACY_HASH_KEY_FILE); or a Secret of the operator's own."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import yaml
from chart_support import RELEASE, SCENARIOS, Rendered, chart_under_test, effective_values, request, run_helm

from cdp_kit.identifier_hash import read_key_file

SECRET = f"{RELEASE}-privacy-hash-key"
HOLDERS = {"collector", "identity", "profile"}


def render(set_values: dict | None = None, *, chart: Path | None = None) -> Rendered:
    scenario = {**SCENARIOS["prod"], "set_values": set_values or {}}
    call = request("template", scenario)
    (result,) = run_helm([{**call, "chart": str(chart)} if chart else call])
    assert result["ok"], result.get("error")
    return Rendered(
        "privacy-hash", effective_values(scenario), [d for d in yaml.safe_load_all(result["manifest"]) if d]
    )


def mounts(r: Rendered) -> dict[str, set[tuple[str, str]]]:
    """component -> {(CDP_PRIVACY_HASH_KEY_FILE, the Secret behind the folder it names)} of its containers."""
    found: dict[str, set[tuple[str, str]]] = {}
    for w in r.component_workloads():
        spec = w["spec"]["template"]["spec"]
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "CDP_PRIVACY_HASH_KEY_FILE" not in env:
                continue
            path = env["CDP_PRIVACY_HASH_KEY_FILE"]
            folder, item = path.rsplit("/", 1)
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            assert [i["path"] for i in volume["secret"]["items"]] == [item]
            component = w["metadata"]["labels"]["app.kubernetes.io/component"]
            found.setdefault(component, set()).add((path, volume["secret"]["secretName"]))
    return found


def key_text(r: Rendered) -> str:
    return r.get("Secret", SECRET)["stringData"]["privacy-hash.key"]


@pytest.mark.parametrize("scenario", ["default", "prod"])
def test_profile_identity_and_the_collector_read_one_key_no_other_component_gets(rendered, scenario, tmp_path):
    r = rendered[scenario]
    given = mounts(r)
    assert set(given) == HOLDERS
    assert set().union(*given.values()) == {("/etc/cdp/privacy-hash/key", SECRET)}
    (tmp_path / "key").write_text(key_text(r))
    keys = read_key_file(tmp_path / "key")  # a key the services accept
    assert not keys.development and len(key_text(r).strip()) == 64
    assert r.get("Secret", SECRET)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_an_upgrade_keeps_the_key_the_cluster_holds(tmp_path):
    held = "held-identifier-hash-key-0123456789abcdef\nolder-identifier-hash-key-0123456789abcdef"
    chart = tmp_path / "cdp"
    shutil.copytree(chart_under_test(), chart)
    template = chart / "templates" / "secret-privacy-hash-key.yaml"
    data = base64.b64encode((held + "\n").encode()).decode()
    cluster = f'(dict "{SECRET}" (dict "data" (dict "privacy-hash.key" "{data}")))'
    call = 'lookup "v1" "Secret" .Release.Namespace $secretName'
    text = template.read_text()
    assert call in text
    template.write_text(text.replace(call, f"get {cluster} $secretName"))
    assert key_text(render(chart=chart)) == held + "\n"
    assert key_text(render()) != key_text(render())  # offline, with nothing held, a fresh one each time


def test_an_existing_secret_is_mounted_and_none_is_made():
    r = render({"privacyHashKey": {"existingSecret": "my-privacy-key", "key": "current.key"}})
    assert not [o for o in r.objects if o["kind"] == "Secret" and o["metadata"]["name"] == SECRET]
    given = mounts(r)
    assert set(given) == HOLDERS
    assert {secret for found in given.values() for _path, secret in found} == {"my-privacy-key"}
