"""How much client a run needs: worker processes for its rate, connections to open before it starts."""

from __future__ import annotations

import math
import os
from typing import Any

# auto_workers adds a worker per this many queries per second: one loop uses ~30 % of a core there.
# One loop did keep TTFT error p99 within 5 ms up to 1,000 QPS, but only on a quiet machine; headroom
# is what keeps p99 low when other processes compete (docs/performance.md).
QPS_PER_WORKER = 400.0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_workers(scenario: str, rate_qps: float | None, cpus: int | None = None) -> int:
    """Client worker processes for a run: ``min(cpus − 1, ceil(rate / QPS_PER_WORKER))``, at least 1.

    ``rate_qps`` is LoadGen's effective rate: ``server_target_qps`` (Server) or ``offline_expected_qps``
    (Offline: what the SUT is expected to complete, so also what the client must stream). SingleStream
    keeps one query in flight: always 1. One core stays for the runner (LoadGen, the receiver thread)
    and the OS, so a 2-core machine always gets the in-process client: measured there, a second
    worker process only adds contention (docs/performance.md).
    """
    if scenario == "SingleStream" or not rate_qps or rate_qps <= QPS_PER_WORKER:
        return 1
    return max(1, min((cpus or usable_cpus()) - 1, math.ceil(rate_qps / QPS_PER_WORKER)))


def prewarm_connections(
    scenario: str,
    rate_qps: float | None,
    latency_s: float,
    min_query_count: int,
    min_duration_s: float,
    max_connections: int,
) -> int:
    """Connections to open before LoadGen starts: the concurrency the run will reach, with room.

    Server: ``1.5 × rate × latency`` (Little's law; latency from the warm-up request). Offline: every
    query is issued at once, so as many as it will issue (LoadGen: max(min_query_count, 1.1 × expected
    QPS × min_duration)). SingleStream: 1. Never more than ``max_connections``.
    """
    if scenario == "SingleStream" or not rate_qps:
        want = 1
    elif scenario == "Server":
        want = math.ceil(1.5 * rate_qps * max(latency_s, 0.001)) + 4
    else:
        want = max(min_query_count, math.ceil(1.1 * rate_qps * min_duration_s))
    return max(1, min(want, max_connections))


# Descriptors a client process needs besides its connections (LoadGen's logs, requests.jsonl, pipes,
# the event loop's epoll and wake-up fds): 18 at most in a runner during a simulator Offline run
# (docs/http.md); 100 leaves room for fan-out pipes and libraries.
FD_HEADROOM = 100


def fit_connections_to_fd_limit(want: int, resource_mod: Any = None) -> tuple[int, str | None]:
    """Connections a process may open: ``want``, after raising the soft RLIMIT_NOFILE as far as needed.

    Each connection is a file descriptor; 1,024 is a common soft limit and Offline opens up to
    ``want`` at once. The soft limit is raised to ``want + FD_HEADROOM`` (at most the hard limit, which
    only root can raise); when the hard limit is lower, the pool is sized to it and the returned note
    says so and how to raise it.

    :param resource_mod: the ``resource`` module (a stand-in in tests); None: the real one.
    :returns: (connections, note or None).
    """
    if resource_mod is None:
        try:
            import resource as resource_mod
        except ImportError:  # not a POSIX system: nothing to raise
            return want, None
    soft, hard = resource_mod.getrlimit(resource_mod.RLIMIT_NOFILE)
    need = want + FD_HEADROOM
    unlimited = resource_mod.RLIM_INFINITY
    if soft == unlimited or soft >= need:
        return want, None
    target = need if hard == unlimited else min(need, hard)
    try:
        resource_mod.setrlimit(resource_mod.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target >= need:
        return want, None
    fit = max(1, target - FD_HEADROOM)
    return fit, (
        f"connections limited to {fit} (asked for {want}): the open-file limit (RLIMIT_NOFILE) is "
        f"{target} (hard limit {hard}); raise it (`ulimit -n {need}`, or the hard limit in "
        "/etc/security/limits.conf / the container's --ulimit nofile) or lower --harness-max-connections"
    )
