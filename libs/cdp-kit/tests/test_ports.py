"""Ports for tests' and `cdpctl up`'s listeners (`cdp_kit.ports`, `natsserver.free_port`): a picked port is
one the kernel never gives an outgoing connection, and one no other live process on the machine picked, so
a listener killed in a test can listen on it again when restarted."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdp_kit import ports
from cdp_kit.natsserver import free_port


@pytest.fixture
def reservations(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "RESERVATIONS", tmp_path / "ports")
    monkeypatch.setattr(ports, "_mine", {})
    yield tmp_path / "ports"
    ports.release_all()


@pytest.fixture
def machine_pair():
    """Two adjacent spare ports this process picked on the machine's own reservations, before `reservations`
    points the module at the test's folder: no other process of the suite (other xdist workers' platforms
    and nats-servers) picks or listens on them while the test hands them out again under its own folder.
    Requested before `reservations`; they stay picked, as any test's picks do, until the process ends."""
    while True:
        port = ports.spare_port()
        pair = range(port, port + 2)
        if (
            pair[1] in ports.SPARE_PORTS
            and not ports.is_mine(pair[1])
            and ports.port_is_free(pair[1])
            and ports.reserve(pair[1])
        ):
            return pair


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_free_ports_lie_below_the_kernels_ephemeral_range(reservations):
    # CI's profile kill test: the service was SIGKILLed and could not listen on its port again ("Address
    # already in use"): bind(0) had given a port of the ephemeral range, and in the moment between the kill
    # and the restart another test's outgoing connection was given it as its local port.
    low = ephemeral_low()
    picked = [free_port() for _ in range(50)]
    assert all(port < low for port in picked)
    assert len(set(picked)) == 50


def test_a_picked_port_survives_a_flood_of_outgoing_connections_while_nothing_listens():
    # The machine's reservations, not a folder of the test's: the listener binds the port at the end, and
    # only a pick other processes honour keeps another worker's listener off it meanwhile.
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        target = listener.getsockname()
        clients = []
        try:
            for _ in range(300):
                client = socket.create_connection(target)
                clients.append(client)
                assert client.getsockname()[1] != port
        finally:
            for client in clients:
                client.close()
    with socket.socket() as service:  # the restarted listener
        service.bind(("127.0.0.1", port))
        service.listen()


def test_a_port_another_live_process_picked_is_not_given(machine_pair, reservations, monkeypatch):
    low, high = machine_pair
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from cdp_kit import ports
        from cdp_kit.natsserver import free_port
        ports.RESERVATIONS = pathlib.Path({str(reservations)!r})
        ports.SPARE_PORTS = range({low}, {high + 1})
        print(free_port(), flush=True)
        time.sleep(60)
        """
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(other.stdout.readline())
        monkeypatch.setattr(ports, "SPARE_PORTS", machine_pair)
        mine = free_port()
        assert {mine, theirs} == {low, high}
        with pytest.raises(RuntimeError, match=f"no free port found in {low}-{high}"):
            free_port()
    finally:
        other.kill()
        other.wait()
    assert free_port() == theirs  # its process is gone, and its pick with it


def test_a_process_keeps_its_newest_picks_only(reservations, monkeypatch):
    monkeypatch.setattr(ports, "KEPT", 3)
    picked = [free_port() for _ in range(5)]
    assert sorted(int(path.name) for path in reservations.iterdir()) == sorted(picked[2:])
    assert all(ports.is_mine(port) for port in picked[2:])
    assert not any(ports.is_mine(port) for port in picked[:2])


def _child_releases(barrier) -> None:
    ports.release_all()
    barrier.wait()


def test_a_forked_child_does_not_release_its_parents_picks(reservations):
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    child = ctx.Process(target=_child_releases, args=(barrier,))
    child.start()
    barrier.wait(timeout=30)
    child.join(timeout=30)
    assert (reservations / str(port)).exists()
    assert ports.is_mine(port)
