"""Child processes that do not outlive the process that started them.

`cdpctl up` starts nats-server, the companions and every service in their own sessions (so a Ctrl-C in
the terminal reaches cdpctl alone, which then stops them in order). If cdpctl itself is SIGKILLed it
cannot stop anything, and without more the children would run on as orphans holding their ports.

On Linux, `die_with_parent()` is a `preexec_fn` that asks the kernel to send the child SIGTERM when its
parent goes (prctl PR_SET_PDEATHSIG), so each child drains and exits as on a normal stop. The kernel
ties this to the *thread* that forked the child: start such children from the main thread or from a
thread that lives as long as the process (asyncio's default executor does). A parent that died between
fork and prctl is caught by comparing the parent pid afterwards. Elsewhere it does nothing.

A `preexec_fn` runs in the forked child while other threads' locks may be held: this one takes none
(one foreign call with integer arguments and a getppid), so it cannot deadlock there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `subprocess.Popen(preexec_fn=...)` that ends the child with `sig` when this process ends."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, called only after it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent went before the request was in place
            os._exit(1)

    return arm
