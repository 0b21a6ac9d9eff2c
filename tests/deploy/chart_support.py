"""What the deploy tests share: the chart's scenarios and a way to render them with Helm's own engine.

Renders go through `tests/deploy/helm batch` (see helm_sdk.py): one process for many renders, so the
Helm library is loaded once. The first run ever also creates the Python 3.12 environment it needs.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cdp"
HELM = ROOT / "tests" / "deploy" / "helm"
RELEASE = "cdp"
NAMESPACE = "cdp"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ("1.31.0", "1.37.0")


def values_file(name: str) -> str:
    return str(CHART / name)


# Each scenario: values files (after the chart's values.yaml) plus values set on top, like `--set-json`.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "dev": {"values_files": [values_file("values-dev.yaml")]},
    "prod": {"values_files": [values_file("values-prod.yaml")]},
    # Adding a service must be a values-only change: one key, everything else from componentDefaults.
    "prod+newcomer": {
        "values_files": [values_file("values-prod.yaml")],
        "set_values": {"components": {"newcomer": {}}},
    },
    # The CRM connector with its connections inline (as a values file would give them) and its
    # credentials from a Secret.
    "crm-inline": {
        "set_values": {
            "crmConnections": {
                "inline": {
                    "connections": [
                        {
                            "id": "hubspot",
                            "kind": "hubspot",
                            "account": "62515",
                            "credentials": {"token": "HUBSPOT_TOKEN", "client_secret": "HUBSPOT_CLIENT_SECRET"},
                            "mappings": [
                                {
                                    "id": "contacts",
                                    "object": "contacts",
                                    "match": {"cdp_id": "person.id"},
                                    "fields": {"email": "traits.email"},
                                },
                            ],
                        }
                    ]
                }
            },
            "components": {"crm": {"envFromSecrets": [{"name": "cdp-crm-credentials"}]}},
        },
    },
    "stateful": {
        "set_values": {
            "components": {
                # Static ownership on SQLite: a count fixed for the volumes' life, said so (else refused).
                "profile": {
                    "stateful": True,
                    "replicas": 3,
                    "acknowledgeFixedReplicas": True,
                    "persistence": {"enabled": True, "size": "5Gi"},
                },
            },
        },
    },
    # Partitions that follow the live replicas: identity holds Kubernetes Leases, profile NATS KV ones;
    # both on MongoDB, the store a partition's next owner can read.
    "leases": {
        "set_values": {
            "mongodb": {"enabled": True},
            "components": {
                "identity": {"replicas": 3, "ownership": "kubernetes", "store": {"kind": "mongodb"}},
                "profile": {"ownership": "nats", "store": {"kind": "mongodb"}},
            },
        },
    },
    # Production with everything the security review asks for: the in-chart NATS (so its policy renders),
    # TLS to NATS with a client certificate, and the peers network policies admit besides the callers.
    "secure": {
        "values_files": [values_file("values-prod.yaml")],
        "set_values": {
            "nats": {"enabled": True},
            "natsAuth": {"enabled": True, "tls": {"existingSecret": "cdp-nats-tls", "clientCertificate": True}},
            "networkPolicy": {
                "enabled": True,
                "grpcFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cdp-ops"}}}],
                "httpFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                "natsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cdp-ops"}}}],
            },
        },
    },
    # Every optional object at once, so each is schema-checked at least once.
    "everything": {
        "values_files": [values_file("values-prod.yaml")],
        "set_values": {
            # What skaffold sets after a pushed build: tag and digest together.
            "image": {
                "repository": "registry.example.com/team/cdp",
                "tag": "v0.1.0-3-gabc123@sha256:" + "0f" * 32,
            },
            "global": {"otlpEndpoint": "http://otel-collector.observability:4318"},
            "mongodb": {"enabled": True, "persistence": {"enabled": True}},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "networkPolicy": {
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
            "auth": {
                "existingSecret": "",
                "tokens": [{"name": "crm-sync", "sha256": "ab" * 32, "scopes": ["collector:write"]}],
            },
            "sources": {
                "existingSecret": "",
                "inline": {"sources": [{"id": "web", "name": "Website", "write_key": "wk_website_1"}]},
            },
            "components": {
                "collector": {
                    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 8},
                    "env": {"CDP_COLLECTOR_MAX_BATCH": "500"},
                    "extraEnv": [
                        {
                            "name": "CDP_EXTRA_SECRET",
                            "valueFrom": {"secretKeyRef": {"name": "extra", "key": "k"}},
                        },
                    ],
                    "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]},
                },
                "segmentation": {"stateful": True, "persistence": {"enabled": True}},
            },
        },
        "api_versions": ["monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor"],
    },
}


@dataclass
class Rendered:
    """One scenario's manifests, parsed."""

    scenario: str
    values: dict[str, Any]
    objects: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise AssertionError(f"{self.scenario}: no {kind} {name!r} among {[self.describe(o) for o in self.objects]}")

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")]

    def component_workloads(self) -> list[dict[str, Any]]:
        """Workloads running the cdp image (not the optional in-chart MongoDB)."""
        return [w for w in self.workloads() if w["metadata"]["labels"]["app.kubernetes.io/component"] != "mongodb"]

    def component(self, workload: dict[str, Any]) -> dict[str, Any]:
        """The top-level values of the component a workload runs (its keys over componentDefaults)."""
        name = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        return {**self.values["componentDefaults"], **(self.values["components"].get(name) or {})}

    @staticmethod
    def describe(o: dict[str, Any]) -> str:
        return f"{o['kind']}/{o['metadata']['name']}"


def run_helm(requests: list[dict[str, Any]], timeout: float = 900) -> list[dict[str, Any]]:
    """Run requests through one helm_sdk.py process; the first call may build its environment."""
    proc = subprocess.run(
        ["bash", str(HELM), "batch"],
        check=False,
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests/deploy/helm batch failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


@functools.cache
def chart_under_test() -> Path:
    """The chart without charts/ and Chart.lock: `skaffold dev` or `helm dependency build` may have
    fetched the nats chart there, and the tests judge this chart's templates, the same on every machine."""
    copy = Path(tempfile.mkdtemp(prefix="cdp-chart-")) / CHART.name
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    atexit.register(shutil.rmtree, copy.parent, ignore_errors=True)
    return copy


def request(action: str, scenario: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action,
        "chart": str(chart_under_test()),
        "release": RELEASE,
        "namespace": NAMESPACE,
        **scenario,
    }


def effective_values(scenario: dict[str, Any]) -> dict[str, Any]:
    """The values a render saw, merged like helm does, for assertions that compare against them."""

    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in scenario.get("values_files", []):
        values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return merge(values, scenario.get("set_values", {}))
