"""`helm template` and `helm lint` without a helm binary, through the Helm v4 Go SDK (helm-python-sdk).

Runs in its own Python 3.12 environment (helm-python-sdk needs 3.12; the workspace is 3.11), which
`tests/deploy/helm` creates on first use. Call it through that script:

    tests/deploy/helm template deploy/helm/cdp -f deploy/helm/cdp/values-dev.yaml
    tests/deploy/helm lint deploy/helm/cdp -f deploy/helm/cdp/values-prod.yaml
    tests/deploy/helm batch < requests.json       # what the tests use: many renders, one process

Rendering is Helm's own engine (`Chart.render`: templates, sprig, values.schema.json) offline.
Unlike `helm template` it does not insist that declared dependencies sit in charts/: that is how the
chart renders here, where the nats chart's repository cannot be reached.

Values files are merged the way the helm CLI merges `-f` files: maps key by key, later files win,
anything else is replaced whole. Each file is parsed by Helm's own YAML loader.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
from helm_python import _native

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion); the tests validate against it.
DEFAULT_KUBE_VERSION = "v1.31.0"


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(values_files: list[str], set_values: dict[str, Any] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in values_files:
        values = merge_values(values, helm.values_from_yaml(Path(path).read_text()) or {})
    return merge_values(values, set_values or {})


def render(request: dict[str, Any]) -> str:
    """Render one chart to a multi-document YAML stream, the way `helm template` prints it."""
    chart = helm.Chart.load(request["chart"])
    values = load_values(request.get("values_files", []), request.get("set_values"))
    options = {
        "name": request.get("release", "cdp"),
        "namespace": request.get("namespace", "cdp"),
        "is_install": True,
        "kube_version": request.get("kube_version", DEFAULT_KUBE_VERSION),
        "api_versions": request.get("api_versions", []),
    }
    # Chart.render's public signature has no kube_version/api_versions (`helm template --kube-version
    # --api-versions`), which the library call takes; this file pins the package version it calls.
    manifests: dict[str, str] = json.loads(
        _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    )
    documents = []
    for source in sorted(manifests):
        body = manifests[source].strip()
        if source.endswith("NOTES.txt") or not body:
            continue
        body = body.removeprefix("---").lstrip("\n")
        documents.append(f"---\n# Source: {source}\n{body}\n")
    return "".join(documents)


def lint(request: dict[str, Any]) -> dict[str, Any]:
    values = load_values(request.get("values_files", []), request.get("set_values"))
    return helm.lint(
        request["chart"],
        values,
        strict=request.get("strict", False),
        namespace=request.get("namespace", "cdp"),
        kube_version=request.get("kube_version", DEFAULT_KUBE_VERSION),
    )


def run_batch(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for request in requests:
        try:
            if request["action"] == "template":
                results.append({"ok": True, "manifest": render(request)})
            elif request["action"] == "lint":
                results.append({"ok": True, "lint": lint(request)})
            else:
                results.append({"ok": False, "error": f"unknown action {request['action']!r}"})
        except helm.HelmError as exc:
            results.append({"ok": False, "error": str(exc), "error_type": type(exc).__name__})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests/deploy/helm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("template", "lint"):
        cmd = sub.add_parser(action)
        cmd.add_argument("chart")
        cmd.add_argument("-f", "--values", dest="values_files", action="append", default=[])
        cmd.add_argument("--set-json", default=None, help="JSON object merged over the values files")
        cmd.add_argument("--release", default="cdp")
        cmd.add_argument("--namespace", default="cdp")
        cmd.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION)
        cmd.add_argument("--api-versions", action="append", default=[])
    sub.choices["lint"].add_argument("--strict", action="store_true", help="warnings fail too, as helm lint --strict")
    sub.add_parser("batch", help="JSON list of requests on stdin, JSON list of results on stdout")
    args = parser.parse_args()

    if args.action == "batch":
        json.dump(run_batch(json.load(sys.stdin)), sys.stdout)
        return 0

    request = {
        "action": args.action,
        "chart": args.chart,
        "values_files": args.values_files,
        "set_values": json.loads(args.set_json) if args.set_json else None,
        "release": args.release,
        "namespace": args.namespace,
        "kube_version": args.kube_version,
        "api_versions": args.api_versions,
        "strict": getattr(args, "strict", False),
    }
    (result,) = run_batch([request])
    if not result["ok"]:
        print(f"Error: {result['error']}", file=sys.stderr)
        return 1
    if args.action == "template":
        sys.stdout.write(result["manifest"])
        return 0
    severities = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    for message in result["lint"]["messages"]:
        print(f"[{severities.get(message['severity'], '?')}] {message['path']}: {message['error']}".rstrip())
    return 1 if result["lint"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
