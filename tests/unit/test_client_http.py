"""The streaming client's HTTP path against in-process servers (tests/httpfakes.py): URL forms,
credentials and headers on the wire, TLS with a private CA and client certificates, forward proxies,
header injection, and the stream's corner cases ([DONE] before the body ends, bad Content-Length,
a POST that may have reached the server, a plain-JSON answer, a stalled stream)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from httpfakes import (
    UPSTREAM,
    FakeHttpServer,
    FakeProxy,
    Reply,
    Seen,
    TlsFiles,
    http_response,
    make_tls,
    server_tls,
)
from test_stream_protocol import TOKENS, chunked, response, sse_body

from harness_fixtures.client.httpconfig import HttpConfig, HttpConfigError, HttpSettings
from harness_fixtures.client.payload import TRTLLM, RequestProfile
from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.client.streaming import RequestRecord, StreamingClient
from harness_fixtures.config import DatasetSpec, GenerationSpec
from harness_fixtures.options import HarnessOptions

N_TOKENS = sum(len(t) for t in TOKENS)


def make_spec(base_url: str, **kw: Any) -> ClientSpec:
    gen = kw.pop("generation", GenerationSpec(max_tokens=4))
    return ClientSpec(
        base_url=base_url,
        served_model="m",
        generation=gen,
        dataset=DatasetSpec(path="unused.json"),
        dataset_path="unused.json",
        request_timeout_s=kw.pop("request_timeout_s", 10),
        **kw,
    )


def run(
    spec: ClientSpec, n: int = 1, *, one_by_one: bool = False, http: HttpConfig | None = None
) -> tuple[list[RequestRecord], list[int | None]]:
    """n requests (all at once, or each after the previous completed); returns records and first ids."""
    done: list[RequestRecord] = []
    firsts: list[int | None] = []
    events = [threading.Event() for _ in range(n)]

    def on_complete(rec: RequestRecord) -> None:
        done.append(rec)
        events[rec.query_id].set()

    client = StreamingClient(
        spec, [[1, 2, 3]] * n, lambda r: firsts.append(r.first_token_id), on_complete, http
    )
    client.start()
    try:
        if one_by_one:
            for i in range(n):
                client.submit([(i, i)])
                assert events[i].wait(30), f"request {i} never completed"
        else:
            client.submit([(i, i) for i in range(n)])
            assert all(e.wait(30) for e in events), f"{len(done)} of {n} completed"
    finally:
        client.stop()
    return sorted(done, key=lambda r: r.query_id), firsts


def ok_stream(_: Seen) -> Reply:
    return Reply(response(sse_body(), "chunked", [5, 9]))


@pytest.fixture
def server() -> Iterator[FakeHttpServer]:
    s = FakeHttpServer(ok_stream)
    yield s
    s.stop()


# -- what goes on the wire -------------------------------------------------------------------------
def test_base_url_forms_and_userinfo_on_the_stream(server: FakeHttpServer) -> None:
    """/v1 is not doubled, the path prefix and query string are kept, user:password is Basic auth."""
    url = server.url(path="/ns/model/v1?api-version=2", userinfo="bob:s%40cret@")
    (rec,), _ = run(make_spec(url))
    assert rec.status == "ok", rec.error
    (seen,) = server.requests
    assert seen.target == "/ns/model/v1/completions?api-version=2"
    assert seen.headers["authorization"] == "Basic " + base64.b64encode(b"bob:s@cret").decode()
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_host_header_has_brackets() -> None:
    server = FakeHttpServer(ok_stream, host="::1")
    try:
        (rec,), _ = run(make_spec(server.url()))
    finally:
        server.stop()
    assert rec.status == "ok", rec.error
    assert server.requests[0].headers["host"] == f"[::1]:{server.port}"


def test_extra_headers_and_api_key_on_the_stream(
    server: FakeHttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_API_KEY", "k-123")
    monkeypatch.setenv("TEST_TENANT_KEY", "t-456")
    settings = HttpSettings(
        api_key_env="TEST_API_KEY", headers={"X-Tenant": "a", "X-Tenant-Key": "env:TEST_TENANT_KEY"}
    )
    (rec,), _ = run(make_spec(server.url(), http=settings))
    assert rec.status == "ok", rec.error
    h = server.requests[0].headers
    assert (h["authorization"], h["x-tenant"], h["x-tenant-key"]) == ("Bearer k-123", "a", "t-456")
    assert h["content-type"] == "application/json" and h["accept"] == "text/event-stream"


@pytest.mark.parametrize("key", ["sekrit\r\nX-Injected: yes", "sekrit\nX-Injected: yes", "sek€rit"])
def test_header_injection_and_non_latin1_keys_are_refused_before_sending(
    server: FakeHttpServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """A CR/LF in a key must not add header lines; a non-Latin-1 key must not kill the client thread
    silently (the request would wait its whole deadline): both are refused when the client is made."""
    monkeypatch.setenv("TEST_API_KEY", key)
    with pytest.raises(HttpConfigError, match=r"\$TEST_API_KEY") as exc:
        StreamingClient(
            make_spec(server.url(), http=HttpSettings(api_key_env="TEST_API_KEY")), [], print, print
        )
    assert "sekrit" not in str(exc.value)
    assert server.requests == []


# -- TLS and proxies -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("source", ["option", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_https_stream_with_private_ca_and_client_certificate(tls: TlsFiles, source: str) -> None:
    server = FakeHttpServer(ok_stream, server_tls(tls, require_client_cert=True))
    env = {} if source == "option" else {source: str(tls.ca)}
    opts = HarnessOptions(
        ca_bundle=tls.ca if source == "option" else None,
        client_cert=tls.client_cert,
        client_key=tls.client_key,
    )
    try:
        settings = HttpSettings.from_options(opts, env)
        (rec,), _ = run(
            make_spec(server.url("localhost"), http=settings), http=HttpConfig.build(settings, env)
        )
    finally:
        server.stop()
    assert rec.status == "ok", rec.error
    assert rec.n_tokens == N_TOKENS


def test_untrusted_or_missing_client_certificate_fail_with_the_reason(tls: TlsFiles) -> None:
    server = FakeHttpServer(ok_stream, server_tls(tls, require_client_cert=True))
    try:
        (untrusted,), _ = run(
            make_spec(server.url("localhost"), http=HttpSettings(ca_bundle=str(tls.other_ca)))
        )
        (no_cert,), _ = run(make_spec(server.url("localhost"), http=HttpSettings(ca_bundle=str(tls.ca))))
    finally:
        server.stop()
    assert untrusted.status == "error" and "not trusted" in (untrusted.error or "")
    assert "--harness-ca-bundle" in (untrusted.error or "")
    assert no_cert.status == "error" and no_cert.error  # the server refused the handshake or closed
    assert server.requests == []


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_stream_through_a_forward_proxy(tls: TlsFiles, scheme: str) -> None:
    """https: a CONNECT tunnel with end-to-end TLS; http: absolute-form requests to the proxy. The server
    name resolves only at the proxy, so a request that bypassed it would fail."""
    server = FakeHttpServer(ok_stream, server_tls(tls) if scheme == "https" else None)
    need = "Basic " + base64.b64encode(b"pu:pp").decode()
    proxy = FakeProxy(hosts={UPSTREAM: ("127.0.0.1", server.port)}, require=need)
    env = {f"{scheme.upper()}_PROXY": f"http://pu:pp@127.0.0.1:{proxy.port}", "SSL_CERT_FILE": str(tls.ca)}
    try:
        settings = HttpSettings.from_options(HarnessOptions(), env)
        url = f"{scheme}://{UPSTREAM}:{server.port}/v1"
        recs, _ = run(
            make_spec(url, http=settings), n=2, one_by_one=True, http=HttpConfig.build(settings, env)
        )
    finally:
        proxy.stop()
        server.stop()
    assert [r.status for r in recs] == ["ok", "ok"], [r.error for r in recs]
    assert proxy.auth_seen[0] == need
    if scheme == "https":
        assert proxy.log == [f"CONNECT {UPSTREAM}:{server.port}"]  # one tunnel, kept alive for both
    else:
        assert proxy.log == [f"POST http://{UPSTREAM}:{server.port}/v1/completions"]
        assert b"Proxy-Authorization" not in server.requests[0].raw_head  # for the proxy only
        assert server.requests[0].headers["host"] == f"{UPSTREAM}:{server.port}"


def test_tls_connections_are_closed_before_the_client_stops(tls: TlsFiles) -> None:
    """A TLS connection closes only after its close_notify exchange: the client waits for it (and
    aborts what is still open after a grace period) before its event loop stops, so no socket
    outlives the client. One left open stays in this process until it is collected, with a
    ResourceWarning then."""
    import psutil

    # The server answers the client's close_notify 0.3 s late, as a proxy relaying it would.
    server = FakeHttpServer(ok_stream, server_tls(tls), close_delay_s=0.3)
    env = {"SSL_CERT_FILE": str(tls.ca)}
    try:
        settings = HttpSettings.from_options(HarnessOptions(), env)
        recs, _ = run(
            make_spec(server.url(path="/v1"), http=settings), n=3, http=HttpConfig.build(settings, env)
        )
        assert [r.status for r in recs] == ["ok"] * 3
        to_server = [
            c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == server.port
        ]
        assert to_server == []  # the client's sockets to the server are all closed
        assert server.connections >= 1 and server.ended == server.connections
    finally:
        server.stop()


def test_proxy_refusing_connect_is_a_clear_error(tls: TlsFiles) -> None:
    proxy = FakeProxy(require="Basic something-else")
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"}
    try:
        settings = HttpSettings()
        (rec,), _ = run(
            make_spec(f"https://{UPSTREAM}:1/v1", http=settings), http=HttpConfig.build(settings, env)
        )
    finally:
        proxy.stop()
    assert rec.status == "error" and "refused CONNECT" in (rec.error or "") and "407" in (rec.error or "")


# -- stream corner cases ---------------------------------------------------------------------------
def head_chunked() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_done_completes_the_request_though_the_body_never_ends() -> None:
    """Everything up to `data: [DONE]`, then silence on an open connection: the answer is complete."""
    body = chunked(sse_body(), [40])
    unfinished = body[: -len(b"0\r\n\r\n")]
    server = FakeHttpServer(lambda _: Reply(head_chunked() + unfinished, after="hang"))
    try:
        (rec,), firsts = run(make_spec(server.url(), request_timeout_s=5))
    finally:
        server.stop()
    assert rec.status == "ok", rec.error  # not "timeout after 5 s"
    assert rec.n_tokens == N_TOKENS and firsts == [TOKENS[0][0]]


@pytest.mark.parametrize(
    "length, fragment",
    [("-1", "invalid Content-Length '-1'"), ("12abc", "invalid Content-Length '12abc'")],
)
def test_bad_content_length_fails_at_once_with_the_reason(length: str, fragment: str) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {length}\r\n\r\n"
    server = FakeHttpServer(lambda _: Reply(head.encode() + sse_body(), after="hang"))
    try:
        (rec,), _ = run(make_spec(server.url(), request_timeout_s=5))
    finally:
        server.stop()
    assert (
        rec.status == "error"
        and rec.error == f"HttpError: {fragment} in the response (must be one non-negative integer)"
    )


def test_post_is_never_resent_after_it_may_have_reached_the_server() -> None:
    """The server reads the second request on a kept-alive connection, then closes without answering:
    the request fails and is counted; it is not sent again (the server may have started on it)."""

    def handler(req: Seen) -> Reply:
        if len(server.requests) == 1:
            return Reply(response(sse_body(), "length", []))
        return Reply(b"", after="close")

    server = FakeHttpServer(handler)
    try:
        recs, _ = run(make_spec(server.url()), n=2, one_by_one=True)
    finally:
        server.stop()
    assert recs[0].status == "ok"
    assert recs[1].status == "error" and "was not re-sent" in (recs[1].error or "")
    assert len(server.requests) == 2 and server.requests[1].connection == 0  # sent once, on the kept one


def test_plain_json_answer_is_reported_as_such() -> None:
    body = json.dumps({"choices": [{"text": "hi", "token_ids": [1, 2]}], "usage": {"completion_tokens": 2}})
    server = FakeHttpServer(lambda _: Reply(http_response(body.encode(), content_type="application/json")))
    try:
        (rec,), firsts = run(make_spec(server.url()))
    finally:
        server.stop()
    assert (
        rec.status == "error"
        and "not an event stream" in (rec.error or "")
        and "2 tokens" in (rec.error or "")
    )
    assert "truncated" not in (rec.error or "") and firsts == []


def test_stalled_stream_fails_after_the_idle_timeout() -> None:
    """The answer starts, then nothing: it fails at the idle timeout, long before the request deadline."""
    first = sse_body().split(b"\n\n")[0] + b"\n\n"  # the first token's event, then nothing
    server = FakeHttpServer(
        lambda _: Reply(head_chunked() + b"%x\r\n%s\r\n" % (len(first), first), after="hang")
    )
    try:
        (rec,), firsts = run(make_spec(server.url(), request_timeout_s=60, idle_timeout_s=0.5))
    finally:
        server.stop()
    assert rec.status == "error" and rec.error == "stream stalled: no data for 0.5 s (idle timeout)"
    assert firsts == [TOKENS[0][0]] and rec.token_ids == []


# -- engines whose streams carry token ids differently ---------------------------------------------
def test_trtllm_completions_ask_for_ids_with_detokenize_false(server: FakeHttpServer) -> None:
    (rec,), _ = run(make_spec(server.url(), request_profile=TRTLLM))
    assert rec.status == "ok" and rec.n_tokens == N_TOKENS
    sent = json.loads(server.requests[0].body)
    assert sent["detokenize"] is False and "return_token_ids" not in sent


def test_usage_counted_stream_without_ids() -> None:
    """A chat stream with no ids (TensorRT-LLM, SGLang): counted from usage; the first-token callback
    carries the time and no id."""
    events = [
        '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":{"completion_tokens":0}}',
        '{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"completion_tokens":1}}',
        '{"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"length"}],"usage":{"completion_tokens":4}}',
        '{"choices":[],"usage":{"completion_tokens":4}}',
        "[DONE]",
    ]
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    server = FakeHttpServer(lambda _: Reply(response(body, "chunked", [30])))
    profile = RequestProfile(name="trtllm", completions_ids="detokenize_false", chat_ids="none")
    try:
        (rec,), firsts = run(
            make_spec(server.url(), request_profile=profile, generation=GenerationSpec(api="chat"))
        )
    finally:
        server.stop()
    assert rec.status == "ok", rec.error
    assert rec.n_tokens == 4 and rec.token_ids == [] and firsts == [None]
    sent = json.loads(server.requests[0].body)
    assert "return_token_ids" not in sent and "detokenize" not in sent
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
