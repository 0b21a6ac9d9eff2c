"""`make` treats uv.lock as an input: a fresh clone (where the uv binary `make` just installed is newer
than every other file) never re-locks, and a lock that no longer matches the pyproject.toml files stops
`make env` with what to do, instead of being rewritten behind the user's back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"


def workspace_copy(tmp_path: Path) -> Path:
    """The files make and uv read to check the lock: Makefile, uv.lock and every pyproject.toml."""
    copy = tmp_path / "ws"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, copy / name)
    for project in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]:
        target = copy / project.relative_to(ROOT)
        target.parent.mkdir(parents=True)
        shutil.copy(project, target)
    return copy


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UV_OFFLINE": "1", "MAKEFLAGS": ""}
    return subprocess.run(
        ["make", "--no-print-directory", f"UV={UV}", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_a_newer_uv_binary_never_relocks(tmp_path):
    ws = workspace_copy(tmp_path)
    # What `make env` would do on a fresh clone: the uv binary is the newest file there is.
    planned = make(ws, "-n", f"VENV={tmp_path / 'venv'}", "-W", str(UV), "env")
    assert planned.returncode == 0, planned.stderr
    assert not re.search(r"uv lock(?! --check)", planned.stdout), planned.stdout
    assert "sync --all-packages --locked" in planned.stdout, planned.stdout


def test_a_stale_lock_stops_make_env_and_is_left_alone(tmp_path):
    ws = workspace_copy(tmp_path)
    assert make(ws, "lock-check").returncode == 0
    project = ws / "libs" / "cdpctl" / "pyproject.toml"
    project.write_text(project.read_text().replace('"click>=8.1"', '"click>=8.1", "tomli-w>=1.0"'))
    lock_before = (ws / "uv.lock").read_bytes()

    result = make(ws, f"VENV={tmp_path / 'venv'}", "env")

    assert result.returncode != 0
    assert "uv.lock is out of date" in result.stderr and "make lock" in result.stderr, result.stderr
    assert (ws / "uv.lock").read_bytes() == lock_before
    assert not (tmp_path / "venv").exists(), "nothing is installed from a lock that does not match"
