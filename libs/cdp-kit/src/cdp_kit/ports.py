"""Ports for the listeners this machine starts itself: `cdpctl up`'s services, and the nats-servers and
service processes of tests and benchmarks.

Two things can take a port between its pick and its listener's bind:
- **The kernel.** A port in Linux's ephemeral range (32768-60999 by default) may be given to anyone's
  outgoing connection as its local port. A port handed out by bind(0) comes from that range, so a picked
  port could be taken for good, and a service killed in a test could not listen on its port again when
  restarted. Picks come from below the range (`SPARE_PORTS`), which the kernel never hands out.
- **Another picker.** Tests run in parallel, and each starts platforms and processes. A pick is an
  exclusive flock(2) on a file named after the port in `RESERVATIONS`, held for as long as the picker lives
  (or until it has made `KEPT` newer picks): the kernel drops the lock when the process ends however it ends
  (SIGKILL included), so there is no stale pick to take over and no window in which two pickers both see one
  as stale. The file holds the picker's pid for people; it is removed when the process exits.

The folder is in the machine's shared temporary folder, so another user could make it first (writable by
all) and put a symbolic link named after a port in it, pointing at a file of ours: opening it to write the
pid truncated that file (a credentials file, a shell profile). So the folder is used only when it is a
folder of this user's, made private if it was not (`_private`), else this user's own (`cdp-ports-<uid>`);
and a reservation is opened without following a link and taken only when it is a plain file of ours.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import socket
import stat
import tempfile
from pathlib import Path


def _below_ephemeral() -> range:
    """20000-31999, or the 12,000 ports below this machine's ephemeral range where it starts lower."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    stop = min(32_000, low)
    return range(max(1_024, stop - 12_000), stop) if stop > 5_000 else range(20_000, 32_000)


SPARE_PORTS = _below_ephemeral()
RESERVATIONS = Path(tempfile.gettempdir()) / "cdp-ports"
# The picks a process keeps: a test suite's worker picks thousands of ports over a run, each pick an open
# descriptor, while a pick matters only until its listener is up (and across that listener's restarts
# within one test). The oldest beyond this many are let go.
KEPT = 1024

_mine: dict[Path, int] = {}  # picked port's file -> the descriptor holding its lock, oldest first
_owner = os.getpid()  # a forked child inherits `_mine` but must not release its parent's picks
_in_use: dict[Path, Path] = {}  # RESERVATIONS -> the folder its picks are made in (`_private`), once checked


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port` (a port in TIME_WAIT counts as free, as it is for a listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def is_mine(port: int) -> bool:
    folder = _in_use.get(RESERVATIONS)
    return folder is not None and (folder / str(port)) in _mine and _owner == os.getpid()


def reserve(port: int) -> bool:
    """Take `port` for this process unless another live process on this machine holds it."""
    global _owner
    if _owner != os.getpid():  # forked: the picks inherited are the parent's
        _mine.clear()
        _owner = os.getpid()
    path = _private(RESERVATIONS) / str(port)
    if path in _mine:
        return True
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        except OSError:  # a link (ELOOP), or a name we may not open: not a reservation of ours to take
            return False
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or held.st_uid != os.getuid() or held.st_nlink > 1:
            os.close(fd)  # a hard link to another file, or someone else's: left alone
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released it (unlinking the name) between our open and our lock: again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        if not _mine:
            atexit.register(release_all)
        _mine[path] = fd
        while len(_mine) > KEPT:
            _release(next(iter(_mine)))
        return True
    return False


def _private(folder: Path) -> Path:
    """`folder` when it is (or is now made) a folder of this user's that only this user can write in; else
    this user's own beside it, `<folder>-<uid>` (module docstring). RuntimeError when neither is. Checked
    once a process: only its owner (or root) can rename or change a folder of the sticky temporary folder."""
    chosen = _in_use.get(folder)
    if chosen is not None:
        return chosen
    for candidate in (folder, folder.with_name(f"{folder.name}-{os.getuid()}")):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(mode=0o700)
        try:
            found = os.lstat(candidate)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid():
            if found.st_mode & 0o077:
                os.chmod(candidate, 0o700)  # a folder (lstat), ours: no link to follow
            _in_use[folder] = candidate
            return candidate
    raise RuntimeError(
        f"{folder} and {folder}-{os.getuid()} are not folders of this user's: remove them to pick ports here"
    )


def _release(path: Path) -> None:
    fd = _mine.pop(path)
    with contextlib.suppress(OSError):
        path.unlink()  # before the unlock: a picker that opened this file locks a name no longer there
    with contextlib.suppress(OSError):
        os.close(fd)


def release_all() -> None:
    """Let go of every pick of this process (at exit, and in tests)."""
    if _owner != os.getpid():
        return
    for path in list(_mine):
        _release(path)


def spare_port(host: str = "127.0.0.1") -> int:
    """A port below the ephemeral range that nothing listens on and no live process on this machine picked
    (this one included: each call gives another port, since one picked before may be about to listen)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(SPARE_PORTS)
        if not is_mine(port) and port_is_free(port, host) and reserve(port):
            return port
    raise RuntimeError(f"no free port found in {SPARE_PORTS.start}-{SPARE_PORTS.stop - 1}")
