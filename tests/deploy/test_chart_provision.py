"""The chart's provisioning Job (templates/provision.yaml): with natsAuth no component's NATS user may
create or change a stream, so a Job of each release revision runs `python -m cdp_kit.provision` as the
`provision` user with the retention settings the components get; the components wait for it and verify.
Rendered statically, and its user, from the rendered auth.conf, run in a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chart_support import CHART, RELEASE, SCENARIOS, Rendered, request, run_helm
from test_chart import env_of
from test_chart_security import components

from cdp_kit.bus.partition_count import PARTITIONED, recorded
from cdp_kit.natsauth import ROLES, permissions_document
from cdp_kit.streamtable import KNOBS, MODEL_STORE_VARIABLE, needed, stream_config

JOB = f"{RELEASE}-provision-1"  # helm template renders revision 1


def job(r: Rendered) -> dict[str, Any]:
    return r.get("Job", JOB)


def job_env(r: Rendered) -> dict[str, str]:
    """The Job's variables with a value (those read from elsewhere: `job_env_from`)."""
    (container,) = job(r)["spec"]["template"]["spec"]["containers"]
    return {name: e["value"] for name, e in env_of(container).items() if "value" in e}


def job_env_from(r: Rendered) -> tuple[dict[str, dict], list[dict]]:
    """The Job's variables read from elsewhere (name -> valueFrom), and its envFrom."""
    (container,) = job(r)["spec"]["template"]["spec"]["containers"]
    return {name: e["valueFrom"] for name, e in env_of(container).items() if "valueFrom" in e}, container.get(
        "envFrom", []
    )


def render(name: str, set_values: dict, values_files=SCENARIOS["prod"]["values_files"]) -> Rendered | str:
    """The chart rendered with `set_values` over prod's values, or helm's error."""
    import yaml

    (result,) = run_helm([request("template", {"values_files": values_files, "set_values": set_values})])
    if not result["ok"]:
        return result["error"]
    return Rendered(name, {}, [doc for doc in yaml.safe_load_all(result["manifest"]) if doc])


@pytest.mark.parametrize("scenario", ["prod", "secure", "everything"])
def test_with_nats_users_a_job_provisions_as_its_own_user(rendered, scenario):
    r = rendered[scenario]
    spec = job(r)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "cdp_kit.provision"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and spec["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = job_env(r)
    assert env["CDP_NATS_CREDENTIALS_FILE"] == "/etc/cdp/nats/credentials.json"
    (volume,) = [v for v in spec["volumes"] if v["name"] == "nats-credentials"]
    assert volume["secret"]["secretName"] == f"{RELEASE}-provision-nats", "its own user, no component's"
    credentials = json.loads(r.get("Secret", f"{RELEASE}-provision-nats")["stringData"]["credentials.json"])
    assert credentials["user"] == "provision" and len(credentials["password"]) >= 32
    # The same NATS as the components, with the same TLS.
    (component,) = r.component_workloads()[:1]
    (theirs,) = component["spec"]["template"]["spec"]["containers"]
    for variable in ("CDP_NATS_URL", "CDP_NATS_TLS_CA_FILE", "CDP_NATS_TLS_CERT_FILE", "CDP_NATS_TLS_KEY_FILE"):
        assert env.get(variable) == env_of(theirs).get(variable, {}).get("value"), variable
    assert env["CDP_PROVISION_SERVICES"].split(",") == sorted(components(r))
    # The ownership bucket only where something keeps leases or shares figures in it.
    mine = components(r)
    segmentation = mine.get("segmentation") or {"ownership": "static", "replicas": 1, "autoscaling": {}}
    wanted = any(c.get("ownership") == "nats" for c in mine.values()) or (
        segmentation.get("ownership") != "static"
        or int(segmentation["replicas"]) > 1
        or bool((segmentation.get("autoscaling") or {}).get("enabled"))
    )
    assert env["CDP_PROVISION_OWNERSHIP_BUCKET"] == str(wanted).lower()


@pytest.mark.parametrize("scenario", ["default", "dev"])
def test_without_nats_users_there_is_no_job_and_the_components_create_their_streams(rendered, scenario):
    r = rendered[scenario]
    assert r.of_kind("Job") == []
    for workload in r.component_workloads():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert "CDP_NATS_PROVISION_WAIT" not in env_of(container)


def test_the_components_wait_for_the_job(rendered):
    r = rendered["prod"]
    for workload in r.component_workloads():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        wait = env_of(container)["CDP_NATS_PROVISION_WAIT"]["value"]
        assert int(wait) == r.values["natsAuth"]["provision"]["waitSeconds"] > 0


def test_the_job_gets_the_retention_the_components_get():
    scenario = {
        "values_files": SCENARIOS["prod"]["values_files"],
        "set_values": {
            "components": {
                "scoring": {"env": {"CDP_SCORING_SCORES_RETENTION_DAYS": "3"}},
                "collector": {"env": {"CDP_EVENTS_RETENTION_DAYS": "2", "CDP_EVENTS_DEDUP_WINDOW": "120"}},
                "identity": {"env": {"CDP_EVENTS_RETENTION_DAYS": "2"}},
                "crm": {"enabled": False},
            }
        },
    }
    (result,) = run_helm([request("template", scenario)])
    assert result["ok"], result.get("error")
    import yaml

    objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
    env = job_env(Rendered("retention", {}, objects))
    assert env["CDP_SCORING_SCORES_RETENTION_DAYS"] == "3"
    assert env["CDP_EVENTS_RETENTION_DAYS"] == "2" and env["CDP_EVENTS_DEDUP_WINDOW"] == "120"
    assert env[MODEL_STORE_VARIABLE] == "nats://cdp-models"
    assert "crm" not in env["CDP_PROVISION_SERVICES"].split(",")
    # One stream setting, one value: two components disagreeing on it fail the render, naming both.
    scenario["set_values"]["components"]["identity"] = {"env": {"CDP_EVENTS_RETENTION_DAYS": "9"}}
    (result,) = run_helm([request("template", scenario)])
    assert not result["ok"]
    assert "components.collector.env.CDP_EVENTS_RETENTION_DAYS" in result["error"]
    assert "components.identity.env.CDP_EVENTS_RETENTION_DAYS" in result["error"]


def test_the_job_passes_every_setting_that_shapes_a_stream():
    text = (CHART / "templates" / "provision.yaml").read_text()
    (listed,) = re.findall(r"\$shaping := list (.*?) }}", text)
    assert set(re.findall(r'"([A-Z_]+)"', listed)) == {k.variable for k in KNOBS} | {MODEL_STORE_VARIABLE}


def test_the_job_gets_the_partition_count_and_the_stream_settings_of_extra_env_and_secrets():
    secret_ref = {"secretKeyRef": {"name": "cdp-retention", "key": "days"}}
    r = render(
        "settings",
        {
            "global": {"partitions": 4},
            "components": {
                "crm": {"extraEnv": [{"name": "CDP_CRM_RETENTION_DAYS", "valueFrom": secret_ref}]},
                "segmentation": {
                    "extraEnv": [{"name": "CDP_SEGMENTATION_RETENTION_DAYS", "value": "5"}],
                    "envFromSecrets": [{"name": "cdp-segmentation-settings", "optional": True}],
                },
                "orchestration": {"envFromSecrets": [{"name": "cdp-orchestration-channels"}]},
            },
        },
    )
    assert isinstance(r, Rendered), r
    env = job_env(r)
    assert env["CDP_PARTITIONS"] == "4"
    for workload in r.component_workloads():  # the count the components get
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert env_of(container)["CDP_PARTITIONS"]["value"] == "4"
    assert env["CDP_SEGMENTATION_RETENTION_DAYS"] == "5"
    read, env_from = job_env_from(r)
    # A setting the components take from their Secrets reaches the Job from the Secret of a component that
    # reads it, that key alone (optional), below the Job's own variables (as the components' own variables
    # win over their Secrets'): never the whole Secret, which holds credentials the Job has no use for.
    assert read == {
        "CDP_CRM_RETENTION_DAYS": secret_ref,
        "CDP_ORCHESTRATION_RETENTION_DAYS": {
            "secretKeyRef": {
                "name": "cdp-orchestration-channels",
                "key": "CDP_ORCHESTRATION_RETENTION_DAYS",
                "optional": True,
            }
        },
    }
    assert env_from == []
    # One stream setting, one value, whichever way a component sets it.
    refused = render(
        "two values",
        {
            "components": {
                "segmentation": {"env": {"CDP_SEGMENTATION_RETENTION_DAYS": "4"}},
                "crm": {"extraEnv": [{"name": "CDP_SEGMENTATION_RETENTION_DAYS", "value": "5"}]},
            }
        },
    )
    assert isinstance(refused, str) and "CDP_SEGMENTATION_RETENTION_DAYS" in refused
    assert "one stream setting, one value" in refused


def test_no_component_may_create_change_delete_or_purge_a_stream_and_the_provisioner_only_that(rendered):
    from test_chart_security import nats_users

    users = {u["user"]: u for u in nats_users(rendered["prod"])}
    for name, user in users.items():
        allowed = user["permissions"]["publish"].get("allow", [])
        for verb in ("CREATE", "UPDATE", "DELETE", "PURGE"):
            touched = [s for s in allowed if s.startswith(f"$JS.API.STREAM.{verb}.")]
            if name == "provision":
                assert verb in ("CREATE", "UPDATE") or touched == [], (name, verb, touched)
            elif verb == "PURGE" and name == "scoring":
                assert touched == ["$JS.API.STREAM.PURGE.OBJ_cdp-models"]  # its own model store's chunks
            else:
                assert touched == [], (name, verb, touched)
    assert users["provision"]["permissions"] == permissions_document()["provision"]
    assert [s for s in users["provision"]["permissions"]["publish"]["allow"] if not s.startswith("$JS.API.")] == []


async def test_the_job_provisions_with_the_rendered_users_in_a_real_nats_server(rendered, tmp_path):
    """auth.conf as rendered, in a real nats-server: the Job's command with its rendered environment and
    credentials makes every stream; then each component, as its own user, finds its streams as specified
    and still may not change one."""
    from cdp_kit.bus import ROUTED, Bus, verify_stream
    from cdp_kit.natsauth import NatsClientSettings
    from cdp_kit.natsserver import NatsServer

    r = rendered["prod"]
    auth = r.get("Secret", f"{RELEASE}-nats-auth")["stringData"]["auth.conf"]

    def credentials_file(name: str) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(r.get("Secret", f"{RELEASE}-{name}-nats")["stringData"]["credentials.json"])
        return path

    with NatsServer(store_dir=tmp_path / "nats", config=auth) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        env.update(job_env(r))
        env.update(CDP_NATS_URL=server.url, CDP_NATS_CREDENTIALS_FILE=str(credentials_file("provision")))
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cdp_kit.provision"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "provisioned" in done.stdout
        for name in components(r):
            security = NatsClientSettings(credentials_file=credentials_file(name))
            async with Bus.connect(server.url, name=name, security=security) as bus:
                role = ROLES[name]  # the streams it looks up (not those its streams source)
                mine = [s for s in needed([name]) if s in (*role.configures, *role.creates, *role.consumes)]
                for stream in mine:
                    await verify_stream(bus.js, stream_config(stream, job_env(r)), ROUTED)
                config = (await bus.js.stream_info(mine[0])).config.as_dict()
                refused = await _request(bus.nc, f"$JS.API.STREAM.UPDATE.{config['name']}", config)
                assert refused is None, name
                # global.partitions, recorded in every partitioned stream the component uses.
                for stream in mine:
                    if stream in PARTITIONED:
                        info = await bus.js.stream_info(stream)
                        assert recorded(info.config) == int(job_env(r)["CDP_PARTITIONS"]) == 8, stream
        # global.partitions changed on the running release: the next revision's Job refuses, naming both.
        env["CDP_PARTITIONS"] = "2"
        again = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cdp_kit.provision"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 1
        assert "was made with CDP_PARTITIONS=8" in again.stderr
        assert "the provisioner has CDP_PARTITIONS=2" in again.stderr and "global.partitions" in again.stderr


async def _request(nc, subject: str, body: dict) -> dict | None:
    import nats.errors

    try:
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=1)
    except nats.errors.TimeoutError:
        return None
    return json.loads(reply.data)


def test_the_job_keeps_as_many_stream_copies_as_global_stream_replicas_says():
    assert job_env(render("one copy", {}))["CDP_NATS_STREAM_REPLICAS"] == "1"
    assert job_env(render("three", {"global": {"streamReplicas": 3}}))["CDP_NATS_STREAM_REPLICAS"] == "3"
    refused = render("six", {"global": {"streamReplicas": 6}})
    assert isinstance(refused, str) and "streamReplicas" in refused
