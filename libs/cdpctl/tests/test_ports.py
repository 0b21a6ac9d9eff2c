"""Port picking across platforms started at once on one machine: a port another live `cdpctl up` picked is
never picked again, even before its service binds it; a pick whose process is gone (however it ended) is
free again; of several pickers racing for one port exactly one gets it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from cdp_kit import ports
from cdpctl import platform


@pytest.fixture
def reservations(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "RESERVATIONS", tmp_path / "ports")
    monkeypatch.setattr(ports, "_mine", {})
    yield tmp_path / "ports"
    ports.release_all()


def other_picker(reservations, port: int) -> subprocess.Popen:
    """Another process that picked `port` the way `cdpctl up` does and lives on (until killed)."""
    code = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from cdp_kit import ports
        ports.RESERVATIONS = pathlib.Path({str(reservations)!r})
        assert ports.reserve({port})
        print("picked", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "picked"
    return proc


def test_a_port_another_live_platform_picked_is_not_picked_again(reservations):
    other = other_picker(reservations, 4222)
    try:
        assert not ports.reserve(4222)
        picked = platform.pick_port(4222)
        assert picked != 4222
        assert (reservations / str(picked)).read_text() == str(os.getpid())
    finally:
        other.kill()
        other.wait()


def test_a_pick_whose_process_was_killed_is_free_again_and_released_at_exit(reservations):
    gone = other_picker(reservations, 25001)
    gone.send_signal(signal.SIGKILL)  # no atexit: its file stays behind, its lock does not
    gone.wait()
    assert (reservations / "25001").exists()
    assert ports.reserve(25001)
    assert (reservations / "25001").read_text() == str(os.getpid())
    assert ports.reserve(25001)  # our own pick stays ours
    ports.release_all()
    assert not (reservations / "25001").exists()


def _race(directory: str, barrier, results) -> None:
    import pathlib

    ports.RESERVATIONS = pathlib.Path(directory)
    ports._mine = {}
    barrier.wait()
    results.put(ports.reserve(25002))
    barrier.wait()  # hold the pick until every racer has answered


def test_of_pickers_racing_for_a_port_left_behind_by_a_dead_one_exactly_one_wins(reservations):
    # The pid-file scheme let two racers both win a stale pick (one read it empty mid-write, or unlinked
    # the other's fresh file as stale): two platforms then started services on one port.
    ctx = multiprocessing.get_context("fork")
    reservations.mkdir()
    for _ in range(15):
        (reservations / "25002").write_text("999999")  # left by a process that is gone
        barrier, results = ctx.Barrier(5), ctx.Queue()
        racers = [ctx.Process(target=_race, args=(str(reservations), barrier, results)) for _ in range(5)]
        for racer in racers:
            racer.start()
        wins = [results.get(timeout=30) for _ in racers]
        for racer in racers:
            racer.join(timeout=30)
        assert sum(wins) == 1


def test_one_platform_never_gets_the_same_port_for_two_listeners(reservations, monkeypatch):
    # A port this process picked is free (nothing listens yet) and its pick is ours, so it used to be
    # picked again for the next listener: two services of one platform were given one port (about once in
    # 60 starts with ~20 listeners over 12,000 spare ports), and the second could not bind.
    monkeypatch.setattr(ports, "SPARE_PORTS", range(25010, 25013))
    for _ in range(10):
        picked = [platform.pick_port(0) for _ in range(3)]
        assert sorted(picked) == [25010, 25011, 25012]
        ports.release_all()
    with pytest.raises(RuntimeError, match="no free port"):
        for _ in range(4):
            platform.pick_port(0)


def test_a_picked_port_in_the_ephemeral_range_is_held_until_its_service_starts(reservations, monkeypatch):
    """A day-2 trial's restart stopped: orchestration could not listen on 50056 ("port is in use"). The
    conventional gRPC ports lie in Linux's ephemeral range, where the kernel may give a picked port to
    someone's outgoing connection before the service binds it. A picked one is held by a bound socket (which
    the kernel never hands out) until right before its service starts."""
    monkeypatch.setattr(platform, "_held", {})
    monkeypatch.delenv("CDP_UP_PORTS", raising=False)
    with socket.socket() as probe:  # a port of the ephemeral range that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert port >= 32_768
    assert platform.pick_port(port) == port
    assert not ports.port_is_free(port)  # held: nobody else gets it meanwhile
    platform.free_held(port)
    with socket.socket() as service:  # its service binds it
        service.bind(("127.0.0.1", port))
        service.listen()
    # A spare port (below the ephemeral range) is not held: the kernel never hands those out.
    spare = platform.pick_port(0)
    assert spare < 32_768 and spare not in platform._held and ports.port_is_free(spare)
