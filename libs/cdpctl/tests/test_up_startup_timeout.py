"""`cdpctl up --startup-timeout` can be given in the environment (CDP_UP_STARTUP_TIMEOUT): `make up` runs
`cdpctl up` with no arguments, and on a loaded machine (CI's test workers, each starting platforms) its
services take longer than the default 60 s to become healthy; the README's `make up` test sets it."""

from __future__ import annotations

from click.testing import CliRunner

from cdpctl import run as run_module
from cdpctl.cli import main
from cdpctl.platform import Workspace


def test_the_startup_timeout_is_read_from_the_environment(tmp_path, monkeypatch):
    given: list[float] = []

    async def up(ws, startup_timeout, policy, *, companions, use_tls):  # the platform itself is not started
        given.append(startup_timeout)
        return 0

    monkeypatch.setattr(run_module, "_up", up)
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(ws.root), "up"], env={"CDP_UP_STARTUP_TIMEOUT": "240"})
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["--home", str(ws.root), "up"], env={"CDP_UP_STARTUP_TIMEOUT": None})
    assert result.exit_code == 0, result.output
    assert given == [240.0, 60.0]
