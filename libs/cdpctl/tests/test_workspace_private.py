"""The workspace `cdpctl up` keeps is its owner's alone: run.json carries the NATS operator's password,
secrets/ every token, data/ the stores and logs/ what the services log. Folders are 0700 and files 0600 from
creation, whatever the umask cdpctl was started with; what nats-server and the services create inherits
cdpctl's umask 077; a workspace an older cdpctl left readable is tightened at `up`, and `up` says so."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client

from cdp_kit.natsserver import NatsServer
from cdpctl import run
from cdpctl.platform import CRM, Workspace, private_umask, write_service_files
from cdpctl.supervise import RestartPolicy, spawn


@pytest.fixture
def loose_umask():
    """The umask most accounts start with: without care, files 0644 and folders 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def loose(root: Path) -> list[str]:
    """Everything under `root` (itself included) that a group or other users can reach, with its mode."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(mode):o}")
    return found


def test_a_prepared_workspace_and_what_cdpctl_writes_in_it_are_the_owners_only(tmp_path, loose_umask):
    ws = Workspace(tmp_path / ".cdp")
    ws.prepare((CRM,))
    ws.write_run({"pid": 1, "nats": "nats://operator:the-unlimited-password@127.0.0.1:4222", "services": {}})
    ws.dev_secret("webhook")
    (written,) = write_service_files(ws, CRM, {"crm-hubspot.api": 8032, "crm-salesforce.api": 8031})
    assert written.exists() and ws.run_file.exists()
    assert loose(ws.root) == []
    assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(ws.run_file.stat().st_mode) == 0o600


def test_what_a_supervised_child_creates_and_its_log_are_the_owners_only(tmp_path, loose_umask):
    """A service creates its own store (SQLite's file and journal) and the supervisor opens its log."""
    store, log = tmp_path / "profile.db", tmp_path / "profile.log"
    script = f"import sqlite3; sqlite3.connect({str(store)!r}).execute('create table t (x)'); print('started')"
    proc = spawn([sys.executable, "-c", script], dict(os.environ), log)
    assert proc.wait(30) == 0
    assert log.read_text().strip() == "started"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


async def test_nats_servers_jetstream_store_made_under_cdpctls_umask_is_the_owners_only(tmp_path, loose_umask):
    ws = Workspace(tmp_path / ".cdp")
    ws.prepare(())
    with private_umask():  # as `cdpctl up` starts (and restarts) it
        server = NatsServer(store_dir=ws.nats_dir).start()
    try:
        nc = Client()
        await nc.connect(server.url, connect_timeout=5)
        try:
            js = nc.jetstream()
            await js.add_stream(name="EVENTS", subjects=["events.>"])
            await js.publish("events.1", b"ada@example.com")
        finally:
            await nc.close()
    finally:
        server.stop()
    assert list((ws.nats_dir / "jetstream").rglob("*.blk")), "no JetStream block file was written"
    assert loose(ws.root) == []


def test_an_older_readable_workspace_is_tightened_and_links_are_left_alone(tmp_path, loose_umask):
    ws = Workspace(tmp_path / ".cdp")
    ws.prepare(())
    (ws.data_dir / "profile.db").write_text("x")
    (ws.logs_dir / "profile.log").write_text("x")
    outside = tmp_path / "shared.txt"
    outside.write_text("someone else's")
    outside.chmod(0o644)
    (ws.root / "link").symlink_to(outside)
    for path in [ws.root, *ws.root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)  # as an older cdpctl left them
    assert ws.make_private() > 0
    assert loose(ws.root) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    assert ws.make_private() == 0  # nothing left to tighten


class _Stop(Exception):
    pass


def test_up_tightens_an_older_workspace_says_so_once_and_starts_everything_under_umask_077(
    tmp_path, loose_umask, monkeypatch, capsys
):
    """`up` before anything starts (nats-server is the first thing it starts: stopped there)."""
    ws = Workspace(tmp_path / ".cdp")
    ws.prepare(())
    ws.root.chmod(0o755)
    (ws.logs_dir / "collector.log").write_text("x")
    (ws.logs_dir / "collector.log").chmod(0o644)
    seen = []

    class Nats(NatsServer):
        def start(self, timeout: float = 10.0):
            mask = os.umask(0)
            os.umask(mask)
            seen.append(mask)
            raise _Stop

    monkeypatch.setattr(run, "NatsServer", Nats)
    for _ in range(2):
        with pytest.raises(_Stop):
            asyncio.run(run._up(ws, 5.0, RestartPolicy(), companions=False))
    assert seen == [0o077, 0o077]
    assert loose(ws.root) == []
    said = " ".join(capsys.readouterr().err.split())  # as one line, whatever the console wrapped
    assert said.count("now its owner's only") == 1, said
    assert os.umask(0o022) == 0o022  # cdpctl's own umask is given back


def test_a_connections_file_the_operator_edited_is_kept_at_the_next_start(tmp_path):
    """A day-2 trial added a field to .cdp/crm/connections.yaml; the next `make up` wrote the dev template
    over it and the edit was gone. A file as cdpctl wrote it is written afresh (its ports brought up to
    date); one edited since is kept and named."""
    ws = Workspace(tmp_path / ".cdp")
    ws.prepare((CRM,))
    ports = {"crm-hubspot.api": 8032, "crm-salesforce.api": 8031, "crm.http": 8035}
    (path,) = write_service_files(ws, CRM, ports)
    assert "127.0.0.1:8032" in path.read_text()

    kept: list = []
    write_service_files(ws, CRM, ports | {"crm-hubspot.api": 9032}, kept)
    assert kept == [] and "127.0.0.1:9032" in path.read_text()  # untouched: written afresh

    edited = path.read_text().replace("Email: traits.email", "Email: traits.email\n          Title: traits.title")
    path.write_text(edited)
    write_service_files(ws, CRM, ports, kept)
    assert kept == [path] and path.read_text() == edited
    assert stat.S_IMODE(path.with_name(path.name + ".written").stat().st_mode) == 0o600


def test_two_writers_of_one_file_at_once_each_leave_a_whole_file_and_no_staging_behind(tmp_path, loose_umask):
    # `cdpctl up`'s supervisor and `cdpctl nats-rotate` both write run.json: staged under one shared name,
    # one writer's rename could carry the other's half-written text into place.
    import threading

    from cdpctl.platform import write_private

    target = tmp_path / "run.json"
    texts = {name: name * 200_000 for name in ("a", "b")}  # large enough that the writes overlap
    seen: set[str] = set()
    failures: list[BaseException] = []

    def writer(text: str) -> None:
        try:
            for _ in range(60):
                write_private(target, text)
                seen.add(target.read_text())
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=writer, args=(text,)) for text in texts.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert seen <= set(texts.values()), "a reader saw a file neither writer wrote whole"
    assert target.read_text() in texts.values()
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no staging file left
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_write_that_fails_leaves_the_file_as_it_was_and_no_staging_behind(tmp_path, monkeypatch):
    from cdpctl import platform

    target = tmp_path / "run.json"
    platform.write_private(target, "before")

    def refuse(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(platform.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        platform.write_private(target, "after")
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
