"""`cdpctl restart SERVICE...`: restart services (or companions) of the running `cdpctl up`.

A service reads some things only at start: the erasure of the persons PRIVACY's notices name (a deletion
ledger replayed after a restore: ledger.py), a changed environment file, a store an operator put back.
Killing its process works (the supervisor starts it again) but counts as a crash and logs as one. This
asks the supervisor instead: the command leaves one request file per service in the home's `restarts/`
folder (owner-only; the name is the service, the content a request id); `cdpctl up` takes it within half a
second, stops the service as any stop does (SIGTERM: it drains; SIGKILL after RESTART_GRACE seconds),
starts it again at once without counting a crash, and records the request on the service's run.json entry
until it answers again (`cdpctl status` shows `restarting (asked)`). The command waits for that, so when
it returns each service is SERVING on a new process.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import click

from cdpctl.common import out
from cdpctl.platform import Workspace, write_private
from cdpctl.supervise import RESTARTING

# Seconds a service asked to restart gets to stop by itself before it is killed (as `cdpctl up`'s stop).
RESTART_GRACE = 20.0
# How often the waiting command reads run.json.
POLL_SECONDS = 0.2


def requests_dir(ws: Workspace) -> Path:
    return ws.root / "restarts"


def ask(ws: Workspace, names: list[str]) -> dict[str, str]:
    """Leave a restart request for each of `names`; their request ids."""
    folder = requests_dir(ws)
    folder.mkdir(mode=0o700, exist_ok=True)
    asked = {}
    for name in names:
        request = uuid.uuid4().hex
        write_private(folder / name, request)
        asked[name] = request
    return asked


def take(ws: Workspace) -> list[tuple[str, str]]:
    """The restart requests waiting (service, request id), each removed as it is read. `cdpctl up` calls
    this on every turn of its supervision loop."""
    folder = requests_dir(ws)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    taken = []
    for entry in entries:
        if entry.name.endswith(".new") or not entry.is_file(follow_symlinks=False):
            continue  # a request still being written (write_private renames it into place), or not one
        path = Path(entry.path)
        try:
            request = path.read_text().strip()
            path.unlink()
        except OSError:
            continue
        taken.append((entry.name, request))
    return taken


def _entry(state: dict, name: str) -> dict | None:
    return (state.get("services") or {}).get(name) or (state.get("companions") or {}).get(name)


def restarted(ws: Workspace, asked: dict[str, str], pids: dict[str, int], timeout: float) -> list[str]:
    """Wait until each asked service runs on a new process and answers (its request no longer recorded on
    its run.json entry); the services still not back when `timeout` passes (empty: all are)."""
    deadline = time.monotonic() + timeout
    waiting = dict(asked)
    while True:
        state = ws.running() or {}
        for name in list(waiting):
            entry = _entry(state, name) or {}
            note = entry.get(RESTARTING)
            if entry.get("pid") not in (None, pids.get(name)) and note is None:
                out.print(f"{name} restarted: pid {entry['pid']}, serving", markup=False, highlight=False)
                del waiting[name]
        if not waiting or time.monotonic() > deadline:
            return list(waiting)
        time.sleep(POLL_SECONDS)


def restart_services(ws: Workspace, names: list[str], timeout: float) -> list[str]:
    """Ask the running `cdpctl up` to restart `names` and wait for them; those not back in `timeout`."""
    state = ws.running()
    if state is None:
        raise click.ClickException(
            f"no platform is running from {ws.root} (`cdpctl up`); in Kubernetes, restart a service with "
            "`kubectl rollout restart deployment/<release>-<service>`"
        )
    known = [*(state.get("services") or {}), *(state.get("companions") or {})]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)}: not a service or companion of this platform ({', '.join(known)})",
            param_hint="SERVICE",
        )
    pids = {name: (_entry(state, name) or {}).get("pid") for name in names}
    asked = ask(ws, names)
    return restarted(ws, asked, pids, timeout)


@click.command()
@click.argument("service", nargs=-1, required=True)
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for every service to serve again")
@click.pass_obj
def restart(ws: Workspace, service: tuple[str, ...], timeout: float) -> None:
    """Restart SERVICE (one or more services or companions of the running `cdpctl up`): each is stopped as
    any stop does (it drains first), started again at once and waited for until it serves. Not a crash:
    the supervisor's crash count is left as it was."""
    names = list(dict.fromkeys(service))
    late = restart_services(ws, names, timeout)
    if late:
        raise click.ClickException(
            f"not serving again within {timeout:.0f} s: {', '.join(late)} (`cdpctl status` shows where they are)"
        )
