"""Port picking across platforms started at once on one machine: a port another live `cdpctl up` picked is
never picked again, even before its service binds it; a pick whose process is gone is taken over."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cdpctl import platform


@pytest.fixture
def reservations(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "_RESERVATIONS", tmp_path / "ports")
    monkeypatch.setattr(platform, "_mine", set())
    yield tmp_path / "ports"
    platform._release_ports()


def other_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_port_another_live_platform_picked_is_not_picked_again(reservations):
    other = other_process()
    try:
        reservations.mkdir()
        (reservations / "4222").write_text(str(other.pid))  # picked, not bound yet
        picked = platform.pick_port(4222)
        assert picked != 4222
        assert (reservations / str(picked)).read_text() == str(os.getpid())
    finally:
        other.kill()
        other.wait()


def test_a_pick_whose_process_is_gone_is_taken_over_and_released_at_exit(reservations):
    gone = other_process()
    gone.kill()
    gone.wait()
    reservations.mkdir()
    (reservations / "25001").write_text(str(gone.pid))
    assert platform._reserve(25001)
    assert (reservations / "25001").read_text() == str(os.getpid())
    assert platform._reserve(25001)  # our own pick stays ours
    platform._release_ports()
    assert not (reservations / "25001").exists()
