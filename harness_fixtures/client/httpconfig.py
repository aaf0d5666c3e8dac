"""One HTTP configuration for every path to a server: the streaming client, the health check and the
``/metrics`` scraper all take their URL forms, headers, credentials, proxy and TLS settings from here.

- :class:`ServerUrl` parses a server URL once: ``/v1`` and a trailing ``/`` are dropped, a path prefix
  and a query string are kept on every request, ``user:password@`` becomes ``Authorization: Basic``,
  IPv6 hosts get brackets in ``Host``.
- :class:`HttpSettings` is the part that is written down (run_spec.json): file paths, header names
  and where each value comes from (``env:VAR``), never a secret.
- :class:`HttpConfig` is the resolved configuration of one process: header values read from the
  environment and validated, the TLS context, the proxy for a URL, and :meth:`HttpConfig.get` for
  the short requests (health, version, metrics).

Exceptions: :class:`HttpConfigError` (an :class:`~harness_fixtures.options.OptionError`: the plugin
turns it into a usage error before any engine starts) for a bad setting; the request paths raise
``HttpError`` (``harness_fixtures.client.http``) for a failed exchange. Facts this relies on:
docs/http.md.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # stdlib, not in typeshed

from pydantic import BaseModel, ConfigDict, Field

from ..options import OptionError
from .errors import CA_FIX, CertificateError, HttpError

if TYPE_CHECKING:
    from ..options import HarnessOptions

__all__ = [
    "CHILD_AUTH_ENV",
    "HttpConfig",
    "HttpConfigError",
    "HttpReply",
    "HttpSettings",
    "Proxy",
    "ServerUrl",
]

# A child process (the LoadGen runner and its client workers) gets a URL's user:password as this
# variable in its environment, never in run_spec.json (a file) or its argv (visible in `ps`).
CHILD_AUTH_ENV = "HARNESS_SERVER_AUTHORIZATION"
ENV_PREFIX = "env:"

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 field-name (token)
# Set by the client itself (framing, connection management, body type) or not supported by it.
_RESERVED = {
    "host": "the client sets Host from the server URL",
    "content-length": "the client frames the request body itself",
    "transfer-encoding": "the client frames the request body itself",
    "connection": "the client manages its keep-alive connections",
    "keep-alive": "the client manages its keep-alive connections",
    "proxy-connection": "the client manages its keep-alive connections",
    "te": "the client manages its keep-alive connections",
    "trailer": "the client sends no trailers",
    "upgrade": "the client speaks HTTP/1.1 only",
    "expect": "the client does not wait for 100-continue",
    "content-type": "requests are JSON (application/json)",
    "accept-encoding": "the client reads uncompressed bodies only",
}
# Header names whose values are credentials: those come from the environment only.
_SECRET_NAME = re.compile(r"(authorization|cookie|key|token|secret|password|passwd|credential|auth)", re.I)
_URL_ENDINGS = ("/completions", "/chat/completions")


class HttpConfigError(OptionError):
    """A server URL, header, proxy or TLS setting that cannot work; the message names it and the fix."""


# -- URLs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerUrl:
    """A server's base URL, parsed once. ``target(path)`` is what goes on the request line."""

    scheme: str
    host: str  # ASCII (IDNA for international names); an IPv6 address without brackets
    port: int
    prefix: str = ""  # the path before /v1, without a trailing slash
    query: str = ""  # without the "?"
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, what: str = "server URL") -> ServerUrl:
        """Parse ``http(s)://[user:password@]host[:port][/prefix][/v1][?query]``.

        :raises HttpConfigError: anything a request could not be built from, with the fix.
        """
        text = url.strip()
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
            raise HttpConfigError(
                f"{what} {_show(url)} contains whitespace or control characters; remove them"
            )
        try:
            u = urlsplit(text)
            port = u.port
        except ValueError as exc:
            raise HttpConfigError(
                f"{what} {_show(url)} is not a valid URL ({exc}); fix the host or port"
            ) from None
        scheme = u.scheme.lower()
        if scheme not in ("http", "https") or not u.hostname:
            raise HttpConfigError(
                f"{what} {_show(url)} must look like http://host[:port][/path] or https://host[:port][/path]"
            )
        if u.fragment or text.endswith("#"):
            raise HttpConfigError(f"{what} {_show(url)} has a #fragment, which is never sent; remove it")
        try:
            host = u.hostname.encode("idna").decode("ascii") if not u.hostname.isascii() else u.hostname
        except UnicodeError:
            raise HttpConfigError(f"{what} {_show(url)}: host {u.hostname!r} is not a valid name") from None
        path = quote(u.path, safe="/%!$&'()*+,;=:@-._~").rstrip("/")
        if path.endswith(_URL_ENDINGS):
            raise HttpConfigError(
                f"{what} {_show(url)} names an endpoint; give the server's base URL (for example "
                f"{_origin(scheme, host, port)}/v1): the client adds /v1/completions itself"
            )
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        username = unquote(u.username) if u.username is not None else None
        password = unquote(u.password) if u.password is not None else None
        return cls(
            scheme=scheme,
            host=host,
            port=port or (443 if scheme == "https" else 80),
            prefix=path,
            query=quote(u.query, safe="=&;%+!$'()*,:@/?-._~"),
            username=username,
            password=password,
        )

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        """``Host`` as RFC 9112 wants it: brackets around IPv6, the port unless it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.tls else 80)
        return host if default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header}"

    @property
    def display(self) -> str:
        """The URL without credentials: what logs, files and messages show."""
        return self.origin + self.prefix + (f"?{self.query}" if self.query else "")

    def target(self, path: str) -> str:
        """The request target for an API path such as ``/v1/completions`` (prefix and query kept)."""
        return self.prefix + path + (f"?{self.query}" if self.query else "")

    def url(self, path: str) -> str:
        return self.origin + self.target(path)

    def basic_auth(self) -> str | None:
        """``Basic …`` from the URL's user:password, or None without userinfo."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def without_credentials(self) -> ServerUrl:
        return ServerUrl(self.scheme, self.host, self.port, self.prefix, self.query)


def _origin(scheme: str, host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{scheme}://{h}" + (f":{port}" if port else "")


def _show(url: str) -> str:
    """A URL for an error message: credentials never printed."""
    return repr(re.sub(r"(//)[^/@\s]*@", r"\1***@", url))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: never sent through a proxy."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- proxies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proxy:
    """An http:// forward proxy: plain requests go to it in absolute form, https ones through CONNECT."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # Proxy-Authorization

    @property
    def display(self) -> str:
        return _origin("http", self.host, self.port)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """``name`` (lowercase) or its uppercase form, lowercase first, as curl, urllib and requests do."""
    for key in (name, name.upper()):
        value = environ.get(key)
        if value:
            return value.strip()
    return None


def _parse_proxy(value: str, source: str) -> Proxy:
    text = value if "://" in value else "http://" + value  # requests and curl read "host:port" so
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as exc:
        raise HttpConfigError(f"{source}={_show(value)} is not a valid proxy URL ({exc})") from None
    if u.scheme.lower() != "http" or not u.hostname:
        raise HttpConfigError(
            f"{source}={_show(value)}: only http:// proxy URLs are supported (https:// targets still "
            "get end-to-end TLS through CONNECT); TLS to the proxy itself and SOCKS are not. Use an "
            "http:// proxy URL, or add the server's host to NO_PROXY"
        )
    auth = None
    if u.username is not None:
        raw = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = "Basic " + base64.b64encode(raw).decode("ascii")
    return Proxy(u.hostname, port or 80, auth)


def _bypass(host: str, port: int, no_proxy: str) -> bool:
    """NO_PROXY as requests reads it: names and domain suffixes (urllib's rules), plus IP networks."""
    if proxy_bypass_environment(f"{host}:{port}", {"no": no_proxy}) or proxy_bypass_environment(
        host, {"no": no_proxy}
    ):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        entry = entry.strip()
        if "/" in entry:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


# -- headers -------------------------------------------------------------------------------------
def check_header_value(value: str, what: str, show_value: bool) -> None:
    """A value must fit on one header line in Latin-1 (RFC 9110 field-value).

    :param show_value: print the value in the message (never for credentials).
    :raises HttpConfigError: CR, LF or another control character, or a character outside Latin-1.
    """
    shown = f" {value!r}" if show_value else ""
    for i, ch in enumerate(value):
        code = ord(ch)
        if ch in "\r\n":
            raise HttpConfigError(
                f"{what}{shown} contains a line break (CR or LF) at position {i}: it would start a new "
                "header line, so it is never sent; remove it (a trailing newline from the file the value "
                "was read from, for example)"
            )
        if (code < 0x20 and ch != "\t") or code == 0x7F:
            raise HttpConfigError(
                f"{what}{shown} contains the control character {ch!r} at position {i}; remove it"
            )
        if code > 0xFF:
            raise HttpConfigError(
                f"{what}{shown} contains a character that is not Latin-1 "
                f"({ch if show_value else f'U+{code:04X}'} at position {i}); HTTP header values are bytes "
                "in Latin-1: encode it (for example "
                "percent- or base64-encode it) before passing it"
            )
    if value != value.strip(" \t"):
        raise HttpConfigError(f"{what}{shown} starts or ends with whitespace, which servers strip; remove it")


def parse_header_option(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` (or ``NAME: VALUE``) of ``--harness-header`` → (name, value source)."""
    sep = "=" if "=" in text and (":" not in text or text.index("=") < text.index(":")) else ":"
    name, found, value = text.partition(sep)
    name = name.strip()
    if not found or not name:
        raise HttpConfigError(
            f"--harness-header {text!r} is not NAME=VALUE; for example "
            "--harness-header 'X-Tenant=team-a' or --harness-header 'X-Api-Key=env:MY_KEY'"
        )
    return name, value.strip()


def _check_name(name: str, source: str) -> None:
    if not _TOKEN.match(name):
        raise HttpConfigError(
            f"{source}: {name!r} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
        )
    reason = _RESERVED.get(name.lower())
    if reason:
        raise HttpConfigError(f"{source}: header {name!r} cannot be set ({reason}); remove it")


# -- the configuration ---------------------------------------------------------------------------
class HttpSettings(BaseModel):
    """HTTP settings as written to run_spec.json: paths and header sources, never a secret value."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ca_bundle: str | None = Field(None, description="PEM file of the CAs to trust for https servers.")
    ca_bundle_source: str | None = Field(
        None,
        description="Where ca_bundle came from: --harness-ca-bundle, SSL_CERT_FILE or REQUESTS_CA_BUNDLE.",
    )
    client_cert: str | None = Field(None, description="PEM certificate (and key) to present to servers.")
    client_key: str | None = Field(None, description="PEM key of client_cert, if not in the same file.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers: name -> literal value, or env:VAR (read in each process).",
    )
    api_key_env: str | None = Field(None, description="Variable holding a bearer token (its name only).")

    @classmethod
    def from_options(cls, options: HarnessOptions, environ: Mapping[str, str] | None = None) -> HttpSettings:
        """The settings of a session: its options, and the CA bundle variables of the environment.

        :raises HttpConfigError: a malformed --harness-header or a duplicate name.
        """
        env = os.environ if environ is None else environ
        ca, source = None, None
        if options.ca_bundle is not None:
            ca, source = str(options.ca_bundle), "--harness-ca-bundle"
        else:
            for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
                if env.get(var):
                    ca, source = env[var], var
                    break
        headers: dict[str, str] = {}
        seen: dict[str, str] = {}
        for text in options.headers:
            name, value = parse_header_option(text)
            if name.lower() in seen:
                raise HttpConfigError(
                    f"--harness-header {name!r} is given twice ({seen[name.lower()]!r} and {text!r}); "
                    "keep one"
                )
            seen[name.lower()] = text
            headers[name] = value
        return cls(
            ca_bundle=ca,
            ca_bundle_source=source,
            client_cert=str(options.client_cert) if options.client_cert else None,
            client_key=str(options.client_key) if options.client_key else None,
            headers=headers,
            api_key_env=options.api_key_env,
        )


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    headers: dict[str, str]  # names lowercased

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class HttpConfig:
    """The resolved HTTP configuration of one process (header values, TLS context, proxies).

    Build it with :meth:`build`: every value is checked there, so a bad one fails before any request.
    Thread-safe for reading; :meth:`get` may be called from several threads.
    """

    def __init__(self, settings: HttpSettings, headers: dict[str, str], environ: Mapping[str, str]) -> None:
        self.settings = settings
        self._headers = headers  # resolved: may hold secrets, never printed
        self._environ = dict(environ)
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.RLock()
        self._managers: dict[Proxy | None, Any] = {}

    def __repr__(self) -> str:
        return f"HttpConfig({self.settings!r})"  # the settings hold no secrets; the values do

    @classmethod
    def build(
        cls,
        settings: HttpSettings | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        check_environment: bool = True,
    ) -> HttpConfig:
        """Resolve and check every value; also loads the TLS files when any are set.

        :param check_environment: also check what only the environment set (proxy URLs, a CA bundle
            from SSL_CERT_FILE / REQUESTS_CA_BUNDLE) now; False leaves that to the first request, so
            a pytest run that uses no benchmark never fails on its environment (the plugin is inert).
        :raises HttpConfigError: naming the option or variable, what is wrong and the fix.
        """
        s = settings or HttpSettings()
        env = os.environ if environ is None else environ
        headers: dict[str, str] = {}
        for name, source in s.headers.items():
            where = f"--harness-header {name}"
            _check_name(name, where)
            if source.startswith(ENV_PREFIX):
                var = source[len(ENV_PREFIX) :]
                value = env.get(var)
                if value is None:
                    raise HttpConfigError(
                        f"{where}={source}: environment variable {var!r} is not set; set it"
                    )
                check_header_value(value, f"{where}: the value of ${var}", show_value=False)
            else:
                if _SECRET_NAME.search(name):
                    raise HttpConfigError(
                        f"{where}: a credential must come from the environment, not the command line "
                        f"(which is written to metadata.yaml); pass --harness-header '{name}=env:VAR' with "
                        "the value in $VAR"
                    )
                value = source
                check_header_value(value, where, show_value=True)
            headers[name] = value
        if s.api_key_env:
            key = env.get(s.api_key_env)
            if key is None:
                raise HttpConfigError(
                    f"--harness-api-key-env {s.api_key_env}: environment variable {s.api_key_env!r} is not "
                    "set; set it to the server's API key"
                )
            check_header_value(key, f"--harness-api-key-env: the value of ${s.api_key_env}", show_value=False)
            if any(n.lower() == "authorization" for n in headers):
                raise HttpConfigError(
                    "--harness-api-key-env and --harness-header Authorization both set Authorization; "
                    "keep one"
                )
            headers["Authorization"] = f"Bearer {key}"
        config = cls(s, headers, env)
        explicit_tls = s.client_cert or s.ca_bundle_source == "--harness-ca-bundle"
        if explicit_tls or (check_environment and s.ca_bundle):
            config.ssl_context()  # a missing or unreadable PEM fails here, not at the first https request
        if check_environment:
            config.proxies()  # a proxy URL that cannot be used fails here too
        return config

    @classmethod
    def from_options(
        cls,
        options: HarnessOptions,
        environ: Mapping[str, str] | None = None,
        *,
        check_environment: bool = True,
    ) -> HttpConfig:
        settings = HttpSettings.from_options(options, environ)
        return cls.build(settings, environ, check_environment=check_environment)

    # -- what each request carries ---------------------------------------------------------------
    def headers_for(self, url: ServerUrl) -> dict[str, str]:
        """Every header this configuration adds to a request to ``url`` (credentials included).

        :raises HttpConfigError: the URL's user:password and another Authorization source both set.
        """
        headers = dict(self._headers)
        basic = url.basic_auth()
        if basic is not None:
            if any(n.lower() == "authorization" for n in headers):
                raise HttpConfigError(
                    f"the server URL {url.display!r} carries user:password (Basic auth) and "
                    "--harness-api-key-env or --harness-header Authorization sets Authorization too; keep one"
                )
            check_header_value(basic, "the user:password of the server URL", show_value=False)
            headers["Authorization"] = basic
        return headers

    def secret_values(self) -> list[str]:
        """Header values read from the environment (API key, ``env:`` headers): never to be written."""
        sources = dict(self.settings.headers)
        out = [v for n, v in self._headers.items() if sources.get(n, "").startswith(ENV_PREFIX)]
        if self.settings.api_key_env and "Authorization" in self._headers:
            out.append(self._headers["Authorization"].removeprefix("Bearer "))
        return out

    def for_child(self, url: ServerUrl) -> tuple[HttpSettings, dict[str, str]]:
        """Settings and extra environment for a process that must send exactly what this one sends.

        A URL's user:password is handed over as ``$HARNESS_SERVER_AUTHORIZATION`` (environment, not a
        file); everything else is in the settings already (``env:`` values are inherited).
        """
        basic = url.basic_auth()
        if basic is None:
            return self.settings, {}
        self.headers_for(url)  # the conflict check, in this process
        headers = {**self.settings.headers, "Authorization": ENV_PREFIX + CHILD_AUTH_ENV}
        return self.settings.model_copy(update={"headers": headers}), {CHILD_AUTH_ENV: basic}

    # -- proxies ---------------------------------------------------------------------------------
    def proxies(self) -> dict[str, Proxy]:
        """{scheme: proxy} from HTTP_PROXY, HTTPS_PROXY and ALL_PROXY (lowercase first)."""
        out: dict[str, Proxy] = {}
        fallback = _env(self._environ, "all_proxy")
        for scheme in ("http", "https"):
            name = f"{scheme}_proxy"
            value = _env(self._environ, name)
            # An uppercase HTTP_PROXY is ignored under CGI (REQUEST_METHOD set), as urllib does: a
            # request's "Proxy:" header would otherwise set it (httpoxy).
            if scheme == "http" and self._environ.get("REQUEST_METHOD") and not self._environ.get(name):
                value = None
            if value or fallback:
                out[scheme] = _parse_proxy(value or fallback or "", name.upper() if value else "ALL_PROXY")
        return out

    def proxy_for(self, url: ServerUrl) -> Proxy | None:
        """The proxy for ``url``: none for loopback hosts and NO_PROXY matches."""
        return self._proxy(url.scheme, url.host, url.port)

    def _proxy(self, scheme: str, host: str, port: int) -> Proxy | None:
        if is_loopback(host):
            return None
        proxy = self.proxies().get(scheme)
        if proxy is None:
            return None
        no_proxy = _env(self._environ, "no_proxy")
        if no_proxy and _bypass(host, port, no_proxy):
            return None
        return proxy

    # -- TLS -------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """The one TLS context of every https request: the CA bundle (else the system's), the client
        certificate, hostname checks on."""
        with self._lock:
            if self._ssl is None:
                self._ssl = self._make_ssl()
            return self._ssl

    def _make_ssl(self) -> ssl.SSLContext:
        s = self.settings
        try:
            ctx = (
                ssl.create_default_context(cafile=s.ca_bundle)
                if s.ca_bundle
                else ssl.create_default_context()
            )
            ctx.set_alpn_protocols(["http/1.1"])  # the only protocol both clients speak
        except (OSError, ssl.SSLError) as exc:
            raise HttpConfigError(
                f"CA bundle {s.ca_bundle!r} (from {s.ca_bundle_source}) cannot be loaded: "
                f"{_ssl_reason(exc)}; point it at a PEM file of CA certificates"
            ) from None
        if s.client_cert:

            def no_password() -> str:
                raise HttpConfigError("encrypted")

            try:
                ctx.load_cert_chain(s.client_cert, s.client_key, password=no_password)
            except HttpConfigError:
                raise HttpConfigError(
                    f"client key {s.client_key or s.client_cert!r} is encrypted; give an unencrypted key "
                    "(for example `openssl pkey -in KEY -out KEY.plain`) with --harness-client-key"
                ) from None
            except (OSError, ssl.SSLError) as exc:
                raise HttpConfigError(
                    f"client certificate {s.client_cert!r}"
                    + (f" with key {s.client_key!r}" if s.client_key else "")
                    + f" cannot be loaded: {_ssl_reason(exc)}; pass a PEM certificate with its key in the "
                    "same file, or the key with --harness-client-key"
                ) from None
        return ctx

    # -- the short requests ----------------------------------------------------------------------
    def get(self, url: ServerUrl, path: str, timeout_s: float) -> HttpReply:
        """GET ``path`` of ``url`` with this configuration (headers, proxy, TLS); no redirects, no retries.

        :raises HttpError: the request failed below HTTP (connect, TLS, proxy, timeout), with the reason.
        """
        return self.fetch(url.url(path), self.headers_for(url), timeout_s)

    def fetch(self, full_url: str, headers: Mapping[str, str], timeout_s: float) -> HttpReply:
        """GET an absolute URL (no credentials in it) with ``headers``, this configuration's proxy and TLS.

        :raises HttpError: as :meth:`get`.
        """
        import urllib3

        u = urlsplit(full_url)
        scheme = u.scheme.lower()
        try:
            port = u.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise HttpError(f"GET {full_url}: {exc}") from None
        manager = self._manager(self._proxy(scheme, u.hostname or "", port))
        try:
            resp = manager.request(
                "GET",
                full_url,
                headers=dict(headers),
                timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                retries=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            cert = _cert_error(exc)
            if cert is not None:
                raise CertificateError(
                    f"GET {full_url}: TLS certificate of {u.hostname} not trusted: "
                    f"{cert.verify_message or cert}; {CA_FIX}"
                ) from None
            raise HttpError(f"GET {full_url}: {_urllib3_reason(exc)}") from None
        return HttpReply(resp.status, resp.data, {k.lower(): v for k, v in resp.headers.items()})

    def _manager(self, proxy: Proxy | None) -> Any:
        import urllib3

        with self._lock:
            manager = self._managers.get(proxy)
            if manager is None:
                # The stream's TLS context: one set of trusted CAs and one client certificate for all.
                kw: dict[str, Any] = {"num_pools": 4, "maxsize": 4, "ssl_context": self.ssl_context()}
                if proxy is None:
                    manager = urllib3.PoolManager(**kw)
                else:
                    headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
                    manager = urllib3.ProxyManager(proxy.display, proxy_headers=headers, **kw)
                self._managers[proxy] = manager
            return manager

    def __enter__(self) -> HttpConfig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections of :meth:`get` (the configuration stays usable)."""
        with self._lock:
            for manager in self._managers.values():
                manager.clear()
            self._managers.clear()


def _ssl_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def _cert_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure inside a urllib3 error, if that is what it was."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        nxt = getattr(exc, "reason", None)
        exc = nxt if isinstance(nxt, BaseException) else exc.__context__
        seen += 1
    return None


def _urllib3_reason(exc: BaseException) -> str:
    """The innermost useful message of a urllib3 error (they wrap the socket's)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException) and reason is not exc:
        return f"{type(exc).__name__}: {_urllib3_reason(reason)}"
    return f"{type(exc).__name__}: {exc}"
