"""The restart policy of `cdpctl up`: backoff that doubles, is capped, resets after a stable run, and
gives up only after repeated fast crashes."""

from __future__ import annotations

from cdpctl.supervise import Backoff, RestartPolicy, describe_exit


def test_delays_double_up_to_the_cap_then_give_up_after_repeated_fast_crashes():
    backoff = Backoff(RestartPolicy(first_delay=1, max_delay=4, stable_after=60, give_up_after=5))
    assert [backoff.after_exit(uptime=2) for _ in range(5)] == [1, 2, 4, 4, 4]
    assert backoff.after_exit(uptime=2) is None


def test_a_service_that_stayed_up_a_while_starts_again_at_the_first_delay():
    backoff = Backoff(RestartPolicy(first_delay=1, max_delay=30, stable_after=60, give_up_after=3))
    assert [backoff.after_exit(uptime=1) for _ in range(3)] == [1, 2, 4]
    assert backoff.after_exit(uptime=3600) == 1  # up an hour: this crash is news, not a crash loop
    assert backoff.after_exit(uptime=1) == 2


def test_exits_read_as_an_operator_expects():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
