"""One LoadGen, many endpoints, without processes: the dispatch policy, per-endpoint statistics, bad
replicas/URL input, the engine manager starting replicas, and the multi-node vLLM recipe's argv."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness_fixtures.client.dispatch import DOWN_AFTER_FAILURES, Dispatcher
from harness_fixtures.client.requestlog import endpoint_stats
from harness_fixtures.config import BenchmarkCase, ConfigError, load_case
from harness_fixtures.options import OPTIONS, HarnessOptions, Option, OptionError
from harness_fixtures.pipeline import check_endpoints
from harness_fixtures.servers import Endpoint, LaunchContext
from harness_fixtures.servers.launchers import VllmLauncher
from harness_fixtures.servers.manager import EngineManager

# -- the dispatch policy ---------------------------------------------------------------------------
# An operation: ("pick",) or ("done", endpoint choice, ok)
ops = st.lists(
    st.one_of(st.just(("pick", 0, True)), st.tuples(st.just("done"), st.integers(0, 63), st.booleans())),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 8), script=ops)
def test_least_outstanding_never_picks_a_busier_endpoint(n: int, script: list[tuple[str, int, bool]]) -> None:
    d = Dispatcher(n, "least-outstanding")
    held: list[int] = []  # endpoints of the queries in flight, as the test counts them
    for op, choice, ok in script:
        if op == "pick":
            before = list(d.inflight)
            usable = [i for i in range(n) if d.down[i] is None] or list(range(n))
            i = d.pick()
            assert i in usable
            # Never an endpoint with more in flight than another usable one; ties: the lowest index.
            assert before[i] == min(before[j] for j in usable)
            assert i == min(j for j in usable if before[j] == before[i])
            held.append(i)
        elif held:
            i = held.pop(choice % len(held))
            d.done(i, ok, None if ok else "HTTP 500")
        assert d.inflight == [held.count(i) for i in range(n)]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 6), picks=st.integers(1, 60))
def test_round_robin_takes_turns_whatever_is_in_flight(n: int, picks: int) -> None:
    d = Dispatcher(n, "round-robin")
    got = [d.pick() for _ in range(picks)]
    assert got == [k % n for k in range(picks)]
    assert d.sent == [got.count(i) for i in range(n)]


def test_a_failing_endpoint_is_taken_out_and_the_others_get_the_queries() -> None:
    d = Dispatcher(3, "least-outstanding")
    for _ in range(DOWN_AFTER_FAILURES):
        assert d.pick() == 0  # idle: the lowest index
        d.done(0, False, "Connection refused")  # a dead server fails fast: 0 in flight again
    assert d.down[0] is not None and "Connection refused" in d.down[0]
    assert {d.pick() for _ in range(6)} == {1, 2}


def test_a_success_between_failures_keeps_an_endpoint_in_service() -> None:
    d = Dispatcher(2)
    for k in range(3 * DOWN_AFTER_FAILURES):
        i = d.pick()
        d.done(i, ok=k % DOWN_AFTER_FAILURES == 0)
    assert d.down == [None, None]


def test_with_every_endpoint_down_queries_still_go_somewhere() -> None:
    """LoadGen must finish: the queries fail honestly on a dead endpoint rather than wait forever."""
    d = Dispatcher(2, "round-robin")
    for _ in range(2 * DOWN_AFTER_FAILURES):
        d.done(d.pick(), False, "refused")
    assert all(d.down)
    assert {d.pick() for _ in range(4)} == {0, 1}


def test_dispatch_is_thread_safe() -> None:
    d = Dispatcher(4)

    def work() -> None:
        for _ in range(2000):
            d.done(d.pick(), True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.inflight == [0, 0, 0, 0] and sum(d.sent) == 8000


def test_bad_dispatch_arguments() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        Dispatcher(0)
    with pytest.raises(ValueError, match="'random' is not one of"):
        Dispatcher(2, "random")  # type: ignore[arg-type]


# -- per-endpoint statistics -----------------------------------------------------------------------
def _row(endpoint: int, ok: bool, issued: float, first: float, done: float, n: int) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "status": "ok" if ok else "error",
        "error": None if ok else f"refused by {endpoint}",
        "issued_s": issued,
        "first_token_s": first if ok else None,
        "done_s": done,
        "n_tokens": n if ok else 0,
    }


def test_endpoint_stats_from_the_request_log() -> None:
    rows = [
        _row(0, True, 0.0, 0.1, 0.5, 5),  # TTFT 100 ms, TPOT 100 ms
        _row(0, True, 0.0, 0.3, 0.7, 3),  # TTFT 300 ms, TPOT 200 ms
        _row(1, False, 0.0, 0.0, 0.2, 0),
        _row(1, True, 1.0, 1.2, 1.6, 5),  # TTFT 200 ms, TPOT 100 ms
    ]
    summary = [{"index": 1, "taken_out": "3 in a row", "engine_window": {"x": 1}}]
    a, b = endpoint_stats(rows, ["http://a:1", "http://b:2"], 2.0, summary)
    assert (a.index, a.url, a.queries, a.completed, a.failures, a.share) == (0, "http://a:1", 2, 2, 0, 0.5)
    assert (a.ttft_ms_p50, a.ttft_ms_p99) == (300.0, 300.0)  # the suite's percentile: nearest rank
    assert (a.tpot_ms_p50, a.tpot_ms_p99) == (200.0, 200.0)
    assert (a.output_tokens, a.output_tokens_per_s, a.taken_out) == (8, 4.0, None)
    assert (b.queries, b.completed, b.failures, b.first_error) == (2, 1, 1, "refused by 1")
    assert (b.ttft_ms_p50, b.output_tokens, b.output_tokens_per_s) == (200.0, 5, 2.5)
    assert b.taken_out == "3 in a row" and b.engine_window == {"x": 1}


def test_endpoint_stats_without_a_duration_or_queries() -> None:
    (e,) = endpoint_stats([], ["http://a:1"], None)
    assert (e.queries, e.share, e.output_tokens_per_s, e.ttft_ms_p50) == (0, None, None, None)


# -- bad input, before any engine starts -----------------------------------------------------------
def _yaml(tmp_path: Path, engine: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(
        "name: m\nengine:\n"
        + "".join(f"  {line}\n" for line in engine.splitlines())
        + "dataset: {path: d.json}\nloadgen_model: {Offline: tiny}\nscenarios: [Offline]\n"
    )
    return path


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ("kind: sim\nreplicas: 0", "engine.replicas must be a whole number >= 1 (got 0)"),
        ("kind: sim\nreplicas: -2", "engine.replicas must be a whole number >= 1 (got -2)"),
        ("kind: sim\nreplicas: two", "replicas: Input should be a valid integer"),
        (
            "kind: external\nurls: [http://a:8000, 'htp//b:8000']",
            "engine.urls entry 'htp//b:8000' must look like http://host[:port]",
        ),
        ("kind: external\nurls: ['http://a:99999']", "engine.urls entry 'http://a:99999' is not a valid URL"),
        (
            "kind: external\nreplicas: 2\nurls: [http://a:8000]",
            "engine.replicas: 2 starts engines of this case, but the case names servers it does not start",
        ),
        ("kind: external\nurl: http://a:1\nurls: [http://b:2]", "engine.url and engine.urls are both set"),
    ],
)
def test_bad_replicas_and_urls_in_a_case(tmp_path: Path, engine: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_case(_yaml(tmp_path, engine))
    assert message in str(err.value)
    assert str(tmp_path / "m.yaml") in str(err.value)  # names the file


def _options(**raw: Any) -> HarnessOptions:
    def get(opt: Option) -> tuple[Any, Any]:
        value = raw.get(opt.dest)
        return (value, "cli") if value is not None else (None, None)

    return HarnessOptions.build(get, Path.cwd(), Path.cwd())


def test_repeated_server_url_and_dispatch_options() -> None:
    o = _options(harness_server_url=["http://a:1/v1", "http://b:2"], harness_dispatch="round-robin")
    assert o.server_urls == ("http://a:1/v1", "http://b:2") and o.server_url == "http://a:1/v1"
    assert o.endpoint_urls() == o.server_urls and o.dispatch == "round-robin"
    assert _options().dispatch == "least-outstanding" and _options().endpoint_urls() == ()
    assert HarnessOptions(server_url="http://a:1").endpoint_urls() == ("http://a:1",)
    with pytest.raises(OptionError, match="'fastest' is not one of"):
        _options(harness_dispatch="fastest")
    assert {o.name for o in OPTIONS} >= {"server-url", "dispatch"}


def test_different_credentials_in_the_urls_is_an_error(tmp_path: Path) -> None:
    urls = ("http://bob:pw1@a:1", "http://bob:pw2@b:2")
    with pytest.raises(OptionError, match="different user:password credentials") as err:
        check_endpoints([_case(tmp_path)], HarnessOptions(server_urls=urls))
    assert "pw1" not in str(err.value) and "pw2" not in str(err.value)  # never the secret
    check_endpoints([_case(tmp_path)], HarnessOptions(server_urls=("http://bob:pw@a:1", "http://bob:pw@b:2")))


def _case(tmp_path: Path, **engine: Any) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": "m",
            "engine": {"kind": "sim", **engine},
            "dataset": {"path": "d.json"},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
            "source": str(tmp_path / "m.yaml"),
        }
    )


def test_replicas_with_a_server_url_is_an_error_naming_the_case(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as err:
        check_endpoints([_case(tmp_path, replicas=4)], HarnessOptions(server_urls=("http://a:1",)))
    assert "m.yaml: engine.replicas is 4, but --harness-server-url" in str(err.value)
    check_endpoints([_case(tmp_path, replicas=4)], HarnessOptions())  # fine without a URL


def test_a_malformed_server_url_in_a_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--harness-server-url 'ftp://b' must look like http://"):
        check_endpoints([_case(tmp_path)], HarnessOptions(server_urls=("http://a:1", "ftp://b")))


# -- the engine manager starts replicas, each its own folder and index -----------------------------
class _FakeLauncher:
    kind = "sim"

    def __init__(self, fail_at: int | None = None) -> None:
        self.started: list[LaunchContext] = []
        self.stopped: list[Endpoint] = []
        self.fail_at = fail_at

    def start(self, ctx: LaunchContext) -> Endpoint:
        if ctx.replica == self.fail_at:
            from harness_fixtures.servers import EngineError

            raise EngineError(f"replica {ctx.replica} would not start")
        self.started.append(ctx)
        return Endpoint("sim", f"http://127.0.0.1:{9000 + ctx.replica}", "m")

    def stop(self, endpoint: Endpoint) -> None:
        self.stopped.append(endpoint)


def test_manager_starts_each_replica_with_its_index_and_folder(tmp_path: Path) -> None:
    fake = _FakeLauncher()
    manager = EngineManager(make_launcher=lambda kind: fake, on_message=lambda _: None)
    eps = manager.get_all(_case(tmp_path, replicas=3), tmp_path / "engine-m")
    assert [ep.base_url for ep in eps] == [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    assert [c.replica for c in fake.started] == [0, 1, 2]
    assert [c.run_dir for c in fake.started] == [tmp_path / "engine-m" / f"replica-{i}" for i in range(3)]
    assert manager.get_all(_case(tmp_path, replicas=3), tmp_path / "engine-m") is eps  # reused
    manager.stop()
    assert fake.stopped == eps


def test_a_replica_that_fails_to_start_stops_its_siblings(tmp_path: Path) -> None:
    from harness_fixtures.servers import EngineError

    fake = _FakeLauncher(fail_at=2)
    manager = EngineManager(make_launcher=lambda kind: fake, on_message=lambda _: None)
    with pytest.raises(EngineError, match="replica 2 would not start"):
        manager.get_all(_case(tmp_path, replicas=3), tmp_path / "engine-m")
    assert len(fake.stopped) == 2 and manager.current is None


def test_manager_checks_each_server_url_as_its_own_endpoint(tmp_path: Path) -> None:
    fake = _FakeLauncher()
    fake.kind = "external"
    manager = EngineManager(
        server_urls=("http://a:1", "http://b:2"), make_launcher=lambda kind: fake, on_message=lambda _: None
    )
    manager.get_all(_case(tmp_path), tmp_path / "engine-m")
    assert [(c.server_url, c.replica) for c in fake.started] == [("http://a:1", 0), ("http://b:2", 1)]


# -- recipe: vLLM across nodes (Ray) ---------------------------------------------------------------
def test_vllm_across_nodes_with_ray_passes_the_flags_through(tmp_path: Path) -> None:
    """The README's recipe: the launcher starts ``vllm serve`` on the Ray head with the parallel
    sizes and the Ray executor; Ray's own tooling has started the cluster."""
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    case = BenchmarkCase.model_validate(
        {
            "name": "m",
            "engine": {
                "kind": "vllm",
                "model": "org/model",
                "executable": str(exe),
                "host": "0.0.0.0",
                "args": {
                    "tensor-parallel-size": 8,
                    "pipeline-parallel-size": 2,
                    "distributed-executor-backend": "ray",
                },
            },
            "dataset": {"path": "d.json"},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
            "source": str(tmp_path / "m.yaml"),
        }
    )
    argv = VllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "0.0.0.0", 8000)
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


# -- what the SUT is (metadata.yaml sut:, the submission's system description) ---------------------
def test_sut_names_a_network_sut_with_its_hosts_and_replicas_on_this_host() -> None:
    from harness_fixtures.pipeline import describe_sut

    remote = [Endpoint("external", f"https://llama-{x}.example:8443/v1", "m") for x in "ab"]
    assert describe_sut(remote, "least-outstanding") == (
        "Network SUT: 2 endpoint(s) on llama-a.example:8443, llama-b.example:8443 "
        "(one LoadGen, dispatch least-outstanding)"
    )
    assert describe_sut(remote[:1], "round-robin") == "Network SUT: 1 endpoint(s) on llama-a.example:8443"
    ours = [Endpoint("vllm", f"http://127.0.0.1:{p}", "m") for p in (8000, 8001)]
    assert describe_sut(ours, "round-robin") == (
        "2 vllm replicas started by the suite on this host (127.0.0.1:8000, 127.0.0.1:8001), one SUT "
        "(one LoadGen, dispatch round-robin)"
    )
    assert describe_sut(ours[:1], "round-robin") is None  # one engine of ours: nothing to say


def test_a_network_sut_is_a_network_system_in_the_submission(tmp_path: Path) -> None:
    from harness_fixtures.exporters.submission import TestRun, system_json
    from harness_fixtures.results import BenchmarkResult, Metadata

    def run(sut: str | None) -> TestRun:
        md = Metadata(
            test_id="t", case={}, scenario="Server", mode="performance", started_utc="", finished_utc=""
        )
        md = md.model_copy(update={"sut": sut})
        result = BenchmarkResult(
            test_id="t",
            model="m",
            scenario="Server",
            mode="performance",
            loadgen_model="llama3_1-8b",
            status="VALID",
        )
        return TestRun(tmp_path, result, md)

    net = system_json([run("Network SUT: 2 endpoint(s) on a:1, b:2")], "sys", "open", "acme")
    assert net["is_network"] == "true" and "Network SUT: 2 endpoint(s) on a:1, b:2" in net["sw_notes"]
    assert system_json([run(None)], "sys", "open", "acme")["is_network"] == "false"
