"""The client's file-descriptor budget (harness_fixtures.client.sizing.fit_connections_to_fd_limit):
the soft RLIMIT_NOFILE is raised to what the connection pool needs, or the pool is sized to the hard
limit with a note saying how to raise it."""

from __future__ import annotations

from harness_fixtures.client.sizing import FD_HEADROOM, fit_connections_to_fd_limit


class FakeResource:
    """resource's RLIMIT_NOFILE calls, with a hard limit only root could raise."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if hard != self.limits[1] or (self.limits[1] != self.RLIM_INFINITY and soft > self.limits[1]):
            raise ValueError("not allowed to raise maximum limit")
        self.calls.append(limits)
        self.limits = limits


def test_fd_limit_raised_to_what_the_pool_needs() -> None:
    res = FakeResource(1024, 1_048_576)
    assert fit_connections_to_fd_limit(1024, res) == (1024, None)
    assert res.limits == (1024 + FD_HEADROOM, 1_048_576)  # soft raised, hard untouched


def test_fd_limit_unchanged_when_enough() -> None:
    res = FakeResource(65536, 65536)
    assert fit_connections_to_fd_limit(1024, res) == (1024, None) and res.calls == []


def test_pool_sized_to_a_low_hard_limit_with_a_clear_note() -> None:
    res = FakeResource(256, 512)
    n, note = fit_connections_to_fd_limit(1024, res)
    assert n == 512 - FD_HEADROOM and res.limits == (512, 512)
    assert note is not None and "RLIMIT_NOFILE" in note and "ulimit -n" in note and "1024" in note
