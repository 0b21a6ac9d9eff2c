"""Port reservations live in the machine's shared temporary folder (`cdp_kit.ports.RESERVATIONS`), which
every local user can write in: one could make the folder first, writable by all, and put in it a symbolic
link named after a port, pointing at a file of ours. Reserving that port opened the link and truncated its
target to write our pid (a NATS credentials file, a shell profile: whatever the link names)."""

from __future__ import annotations

import os
import stat

import pytest

from cdp_kit import ports


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """The reservations folder as another user could have left it: made first, writable by everyone."""
    folder = tmp_path / "cdp-ports"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setattr(ports, "RESERVATIONS", folder)
    monkeypatch.setattr(ports, "_mine", {})
    monkeypatch.setattr(ports, "_in_use", {}, raising=False)
    yield folder
    ports.release_all()


def test_a_link_planted_in_the_folder_never_truncates_what_it_points_at(shared, tmp_path):
    victim = tmp_path / "credentials.json"
    victim.write_text('{"user": "profile", "password": "kept"}')
    port = ports.SPARE_PORTS.start
    (shared / str(port)).symlink_to(victim)
    assert not ports.reserve(port)  # not a reservation of ours: another port is picked instead
    assert victim.read_text() == '{"user": "profile", "password": "kept"}'
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700  # ours, and from now on only ours to write in
    assert ports.reserve(port + 1) and (shared / str(port + 1)).read_text() == str(os.getpid())


def test_a_hard_link_planted_in_the_folder_is_left_alone(shared, tmp_path):
    victim = tmp_path / "profile"
    victim.write_text("export PATH=/usr/bin")
    port = ports.SPARE_PORTS.start + 2
    os.link(victim, shared / str(port))
    assert not ports.reserve(port)
    assert victim.read_text() == "export PATH=/usr/bin"


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user's needs root")
def test_a_folder_another_user_made_is_not_used(tmp_path, monkeypatch):
    folder = tmp_path / "cdp-ports"
    folder.mkdir(mode=0o777)
    os.chown(folder, 65534, 65534)
    monkeypatch.setattr(ports, "RESERVATIONS", folder)
    monkeypatch.setattr(ports, "_mine", {})
    monkeypatch.setattr(ports, "_in_use", {}, raising=False)
    try:
        port = ports.spare_port()
        own = tmp_path / f"cdp-ports-{os.getuid()}"
        assert (own / str(port)).exists() and not any(folder.iterdir())
        assert ports.is_mine(port)
    finally:
        ports.release_all()
