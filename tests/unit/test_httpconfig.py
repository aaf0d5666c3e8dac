"""The one HTTP configuration (harness_fixtures.client.httpconfig): URL forms, headers and credentials,
proxy choice, TLS files, and the short GET path through a real loopback server, TLS and a proxy."""

from __future__ import annotations

import base64
import string
from collections.abc import Iterator
from pathlib import Path

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
from hypothesis import given, settings
from hypothesis import strategies as st

from harness_fixtures.client.errors import HttpError
from harness_fixtures.client.http import ConnectionPool
from harness_fixtures.client.httpconfig import (
    CHILD_AUTH_ENV,
    HttpConfig,
    HttpConfigError,
    HttpSettings,
    Proxy,
    ServerUrl,
    check_header_value,
)
from harness_fixtures.options import HarnessOptions
from harness_fixtures.servers.base import EngineError, wait_healthy


# -- URL forms -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, target, host",
    [
        ("http://h:8000", "/v1/completions", "h:8000"),
        ("http://h:8000/", "/v1/completions", "h:8000"),
        ("http://h:8000/v1", "/v1/completions", "h:8000"),  # not /v1/v1/completions
        ("http://h:8000/v1/", "/v1/completions", "h:8000"),
        ("https://route.example/ns/model/v1", "/ns/model/v1/completions", "route.example"),
        (
            "https://gw.example:443/p?api-version=2024-06",
            "/p/v1/completions?api-version=2024-06",
            "gw.example",
        ),
        ("http://[::1]:8001/v1", "/v1/completions", "[::1]:8001"),
        ("http://[::1]/", "/v1/completions", "[::1]"),
        ("HTTP://H.Example:80", "/v1/completions", "h.example"),
        ("http://bücher.example/zürich", "/z%C3%BCrich/v1/completions", "xn--bcher-kva.example"),
    ],
)
def test_url_forms(url: str, target: str, host: str) -> None:
    u = ServerUrl.parse(url)
    assert u.target("/v1/completions") == target
    assert u.host_header == host
    assert u.url("/health").startswith(u.origin)
    assert u.basic_auth() is None


def test_userinfo_becomes_basic_auth_and_never_shows() -> None:
    u = ServerUrl.parse("https://bob:s%40cret:x@host.example/v1")
    assert u.basic_auth() == "Basic " + base64.b64encode(b"bob:s@cret:x").decode()
    for shown in (u.display, u.url("/v1/models"), repr(u)):
        assert "cret" not in shown and "bob" not in shown


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("ftp://h/v1", "must look like http://host"),
        ("http:///v1", "must look like http://host"),
        ("http://h:99999", "not a valid URL"),
        ("http://h:port", "not a valid URL"),
        ("http://h/v1#frag", "#fragment"),
        ("http://h/v1/completions", "names an endpoint"),
        ("http://h/v1/chat/completions", "names an endpoint"),
        ("http://h/ v1", "whitespace"),
    ],
)
def test_bad_urls_are_refused_with_the_fix(url: str, fragment: str) -> None:
    with pytest.raises(HttpConfigError, match=fragment):
        ServerUrl.parse(url)


def test_bad_url_message_never_prints_the_password() -> None:
    with pytest.raises(HttpConfigError) as exc:
        ServerUrl.parse("ftp://bob:hunter2@h/v1")
    assert "hunter2" not in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(
        st.text(string.ascii_letters + string.digits + "-._~", min_size=1, max_size=8), max_size=3
    ),
    v1=st.booleans(),
    slash=st.booleans(),
    query=st.text(string.ascii_letters + string.digits + "=&-_", max_size=20),
)
def test_prefix_and_query_kept_on_every_path(segments: list[str], v1: bool, slash: bool, query: str) -> None:
    segments = [s for s in segments if s != "v1"]
    prefix = "".join(f"/{s}" for s in segments)
    url = f"http://h:1{prefix}{'/v1' if v1 else ''}{'/' if slash else ''}{'?' + query if query else ''}"
    u = ServerUrl.parse(url)
    for path in ("/v1/completions", "/health", "/metrics"):
        assert u.target(path) == prefix + path + (f"?{query}" if query else "")


# -- headers ---------------------------------------------------------------------------------------
def options(**kw: object) -> HarnessOptions:
    return HarnessOptions(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("sekrit\r\nX-Injected: 1", "line break"),
        ("sekrit\n", "line break"),
        ("sekrit\x01", "control character"),
        ("sekrét", None),  # Latin-1: allowed
        ("sek€rit", "not Latin-1"),
        (" sekrit", "whitespace"),
    ],
)
def test_api_key_values_are_checked_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str | None
) -> None:
    monkeypatch.setenv("TEST_KEY", value)
    if fragment is None:
        cfg = HttpConfig.from_options(options(api_key_env="TEST_KEY"))
        assert cfg.headers_for(ServerUrl.parse("http://h"))["Authorization"] == f"Bearer {value}"
        return
    with pytest.raises(HttpConfigError, match=fragment) as exc:
        HttpConfig.from_options(options(api_key_env="TEST_KEY"))
    assert "$TEST_KEY" in str(exc.value) and "sekrit" not in str(exc.value)  # never the secret


def test_api_key_env_that_is_not_set_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(HttpConfigError, match="'NO_SUCH_KEY_VAR' is not set"):
        HttpConfig.from_options(options(api_key_env="NO_SUCH_KEY_VAR"))


def test_extra_headers_literal_and_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANT_TOKEN", "t0k")
    cfg = HttpConfig.from_options(options(headers=("X-Tenant=team-a", "X-Api-Key=env:TENANT_TOKEN")))
    assert cfg.headers_for(ServerUrl.parse("http://h")) == {"X-Tenant": "team-a", "X-Api-Key": "t0k"}
    # The written settings keep the source, never the value.
    assert cfg.settings.headers == {"X-Tenant": "team-a", "X-Api-Key": "env:TENANT_TOKEN"}
    assert "t0k" not in repr(cfg) + cfg.settings.model_dump_json()


@pytest.mark.parametrize(
    "header, fragment",
    [
        ("X-Bad Name=v", "not a valid header name"),
        ("Host=evil", "cannot be set"),
        ("Content-Length=5", "cannot be set"),
        ("Accept-Encoding=gzip", "uncompressed"),
        ("Authorization=Bearer literal", "must come from the environment"),
        ("X-Api-Key=literal", "must come from the environment"),
        ("X-Thing=env:NOT_SET_ANYWHERE", "is not set"),
        ("novalue", "is not NAME=VALUE"),
        ("X-A=1\r\nX-B: 2", "line break"),
    ],
)
def test_bad_headers_are_refused(monkeypatch: pytest.MonkeyPatch, header: str, fragment: str) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(HttpConfigError, match=fragment):
        HttpConfig.from_options(options(headers=(header,)))


def test_duplicate_header_and_authorization_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K", "v")
    with pytest.raises(HttpConfigError, match="given twice"):
        HttpConfig.from_options(options(headers=("X-A=1", "x-a=2")))
    with pytest.raises(HttpConfigError, match="both set Authorization"):
        HttpConfig.from_options(options(api_key_env="K", headers=("Authorization=env:K",)))
    cfg = HttpConfig.from_options(options(api_key_env="K"))
    with pytest.raises(HttpConfigError, match="carries user:password"):
        cfg.headers_for(ServerUrl.parse("http://u:p@h"))


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=30))
def test_a_checked_value_is_exactly_one_header_line(value: str) -> None:
    """Whatever the value, it is refused or it stays on its own line of the request head."""
    try:
        check_header_value(value, "X-Test", show_value=True)
    except HttpConfigError:
        bad = [c for c in value if ord(c) > 0xFF or ord(c) == 0x7F or (ord(c) < 0x20 and c != "\t")]
        assert bad or value != value.strip(" \t")
        return
    cfg = HttpConfig(HttpSettings(), {"X-Test": value}, {})
    head = ConnectionPool("http://h:1", cfg).request_head("/v1/completions", {"Accept": "x"})
    lines = head.decode("latin-1").split("\r\n")
    assert lines[-1] == "" and f"X-Test: {value}" in lines
    assert len(lines) == 5  # request line, Host, Accept, X-Test, and the final CRLF


def test_for_child_moves_url_credentials_to_the_environment() -> None:
    cfg = HttpConfig.build(HttpSettings(headers={"X-Tenant": "a"}), {})
    url = ServerUrl.parse("https://bob:pw@h.example/v1")
    settings_, env = cfg.for_child(url)
    assert settings_.headers == {"X-Tenant": "a", "Authorization": f"env:{CHILD_AUTH_ENV}"}
    assert env == {CHILD_AUTH_ENV: url.basic_auth()}
    assert "pw" not in settings_.model_dump_json() and "Ym9i" not in settings_.model_dump_json()
    # The child, with that environment, sends what this process sends.
    child = HttpConfig.build(settings_, env)
    assert child.headers_for(url.without_credentials()) == cfg.headers_for(url)


# -- proxies ---------------------------------------------------------------------------------------
def cfg_env(**env: str) -> HttpConfig:
    return HttpConfig.build(HttpSettings(), env)


def test_proxy_choice() -> None:
    cfg = cfg_env(
        HTTPS_PROXY="http://u:p@proxy:3128", HTTP_PROXY="proxy2:8080", NO_PROXY=".internal,10.0.0.0/8"
    )
    https = cfg.proxy_for(ServerUrl.parse("https://api.example/v1"))
    assert https is not None and (https.host, https.port) == ("proxy", 3128)
    assert https.authorization == "Basic " + base64.b64encode(b"u:p").decode()
    plain = cfg.proxy_for(ServerUrl.parse("http://api.example"))
    assert plain is not None and (plain.host, plain.port, plain.authorization) == ("proxy2", 8080, None)
    for direct in ("https://svc.internal", "http://10.1.2.3:8000", "http://127.0.0.1:8000", "http://[::1]:1",
                   "http://localhost:8000"):  # fmt: skip
        assert cfg.proxy_for(ServerUrl.parse(direct)) is None, direct
    # lowercase wins, as in curl and urllib; ALL_PROXY is the fallback
    lower_wins = cfg_env(https_proxy="http://a:1", HTTPS_PROXY="http://b:2")
    assert lower_wins.proxy_for(ServerUrl.parse("https://x")) == Proxy("a", 1)
    assert cfg_env(ALL_PROXY="http://c:3").proxy_for(ServerUrl.parse("http://x")) is not None
    assert (
        cfg_env(HTTP_PROXY="http://c:3", REQUEST_METHOD="GET").proxy_for(ServerUrl.parse("http://x")) is None
    )


@pytest.mark.parametrize("proxy", ["https://p:443", "socks5://p:1080"])
def test_unsupported_proxies_are_refused_clearly(proxy: str) -> None:
    with pytest.raises(HttpConfigError, match="only http:// proxy URLs"):
        cfg_env(HTTPS_PROXY=proxy)


# -- TLS files -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_ca_bundle_sources_in_order(tls: TlsFiles, tmp_path: Path) -> None:
    other = str(tls.other_ca)
    assert HttpSettings.from_options(options(ca_bundle=tls.ca), {"SSL_CERT_FILE": other}).ca_bundle == str(
        tls.ca
    )
    s = HttpSettings.from_options(options(), {"SSL_CERT_FILE": str(tls.ca), "REQUESTS_CA_BUNDLE": other})
    assert (s.ca_bundle, s.ca_bundle_source) == (str(tls.ca), "SSL_CERT_FILE")
    s = HttpSettings.from_options(options(), {"REQUESTS_CA_BUNDLE": str(tls.ca)})
    assert (s.ca_bundle, s.ca_bundle_source) == (str(tls.ca), "REQUESTS_CA_BUNDLE")


def test_bad_tls_files_fail_at_build(tls: TlsFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(HttpConfigError, match=r"CA bundle .* cannot be loaded"):
        HttpConfig.build(
            HttpSettings(ca_bundle=str(tmp_path / "missing.pem"), ca_bundle_source="SSL_CERT_FILE"), {}
        )
    with pytest.raises(HttpConfigError, match=r"CA bundle .* cannot be loaded"):
        HttpConfig.build(HttpSettings(ca_bundle=str(junk)), {})
    with pytest.raises(HttpConfigError, match=r"client certificate .* cannot be loaded"):
        HttpConfig.build(HttpSettings(client_cert=str(tls.client_cert)), {})  # key missing


def test_encrypted_client_key_is_refused_not_prompted(tls: TlsFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls.client_key.read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(HttpConfigError, match="is encrypted"):
        HttpConfig.build(HttpSettings(client_cert=str(tls.client_cert), client_key=str(enc)), {})


# -- the short GET path (health check, /metrics) through TLS, auth and a proxy ----------------------
def models_handler(req: Seen) -> Reply:
    if req.target.endswith("/health") or "/health?" in req.target:
        return Reply(http_response(b"", content_type="text/plain"))
    return Reply(http_response(b'{"data": [{"id": "m"}]}', content_type="application/json"))


@pytest.fixture
def https_server(tls: TlsFiles) -> Iterator[FakeHttpServer]:
    server = FakeHttpServer(models_handler, server_tls(tls, require_client_cert=True))
    yield server
    server.stop()


def test_health_check_with_ca_bundle_client_cert_and_basic_auth(
    https_server: FakeHttpServer, tls: TlsFiles
) -> None:
    settings_ = HttpSettings(
        ca_bundle=str(tls.ca), client_cert=str(tls.client_cert), client_key=str(tls.client_key)
    )
    with HttpConfig.build(settings_, {}) as cfg:
        wait_healthy(None, https_server.url("localhost", "/prefix/v1?v=1", "bob:pw@"), "m", None, 5, cfg)
    assert [r.target for r in https_server.requests] == ["/prefix/health?v=1", "/prefix/v1/models?v=1"]
    assert all(r.headers["authorization"] == "Basic " + base64.b64encode(b"bob:pw").decode()
               for r in https_server.requests)  # fmt: skip


def test_untrusted_certificate_fails_at_once_with_the_fix(
    https_server: FakeHttpServer, tls: TlsFiles
) -> None:
    with HttpConfig.build(HttpSettings(ca_bundle=str(tls.other_ca)), {}) as cfg:
        with pytest.raises(EngineError, match="--harness-ca-bundle") as exc:
            wait_healthy(None, https_server.url("localhost"), "m", None, 30, cfg)  # not the 30 s: at once
        assert "certificate" in str(exc.value).lower()
        with pytest.raises(HttpError, match="certificate"):
            cfg.get(ServerUrl.parse(https_server.url("localhost")), "/health", 5)


def test_get_through_proxy_with_connect_and_proxy_auth(tls: TlsFiles) -> None:
    server = FakeHttpServer(models_handler, server_tls(tls))
    need = "Basic " + base64.b64encode(b"pu:pp").decode()
    proxy = FakeProxy(hosts={UPSTREAM: ("127.0.0.1", server.port)}, require=need)
    try:
        env = {"HTTPS_PROXY": f"http://pu:pp@127.0.0.1:{proxy.port}", "SSL_CERT_FILE": str(tls.ca)}
        url = ServerUrl.parse(f"https://{UPSTREAM}:{server.port}/v1")
        with HttpConfig.build(HttpSettings.from_options(options(), env), env) as cfg:
            assert cfg.get(url, "/health", 5).status == 200
        assert proxy.log == [f"CONNECT {UPSTREAM}:{server.port}"] and proxy.auth_seen == [need]
        # NO_PROXY: straight to upstream.test, which only the proxy can resolve
        env["NO_PROXY"] = UPSTREAM
        with (
            HttpConfig.build(HttpSettings(ca_bundle=str(tls.ca)), env) as cfg,
            pytest.raises(HttpError, match=UPSTREAM),
        ):
            cfg.get(url, "/health", 5)
    finally:
        proxy.stop()
        server.stop()


def test_loopback_is_never_proxied(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeHttpServer(models_handler)
    try:
        # A proxy that does not exist: any request sent to it would fail.
        env = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
        with HttpConfig.build(HttpSettings(), env) as cfg:
            wait_healthy(None, server.url(), "m", None, 5, cfg)
    finally:
        server.stop()


def test_secret_values_are_the_ones_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K", "api-k")
    monkeypatch.setenv("T", "tenant-k")
    cfg = HttpConfig.from_options(options(api_key_env="K", headers=("X-Key=env:T", "X-Plain=visible")))
    assert sorted(cfg.secret_values()) == ["api-k", "tenant-k"]


def test_environment_problems_wait_for_a_request_that_needs_them() -> None:
    """A broken proxy variable must not fail a pytest run that benchmarks nothing, nor a request to a
    loopback engine; it fails the first request that would use it, naming the variable."""
    env = {"HTTPS_PROXY": "socks5://p:1080", "SSL_CERT_FILE": "/no/such/ca.pem"}
    cfg = HttpConfig.build(HttpSettings.from_options(options(), env), env, check_environment=False)
    assert cfg.proxy_for(ServerUrl.parse("https://127.0.0.1:8000")) is None
    with pytest.raises(HttpConfigError, match="HTTPS_PROXY="):
        cfg.proxy_for(ServerUrl.parse("https://api.example"))
    with pytest.raises(HttpConfigError, match="SSL_CERT_FILE"):
        cfg.ssl_context()
