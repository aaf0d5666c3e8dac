"""The one place secrets are hidden: every file, log line, terminal line and MLflow field passes here.

What is hidden, and how it is recognised:

- credentials in URLs: ``scheme://user:password@host`` → ``scheme://***@host``;
- values of secret-looking names: a flag (``--api-key VALUE``, ``--hf-token=VALUE``), an environment
  variable (``HF_TOKEN``), a key of the case's ``engine.env`` / ``engine.args`` or ``NAME=VALUE`` in
  text. A name is secret-looking when its last word (split at ``-``, ``_``, ``.`` and camelCase) is
  a secret word (key, token, secret, password, auth, ...): ``api_key``, ``HF_TOKEN`` and
  ``--hf-token`` are secret; ``api_key_env`` and ``HF_TOKEN_PATH`` (they name where the secret is),
  ``max_num_batched_tokens``, ``--ttft-per-prompt-token-ms`` and ``eos_token`` (a token of the
  vocabulary) are not;
- every known secret value wherever it appears: the values registered with :func:`add_secrets`
  (the API key, the cases' engine secrets, URL passwords) and those of secret-looking environment
  variables. Values shorter than :data:`MIN_VALUE_LEN` characters, and values that are plainly not
  secrets (``true``, ``0``), are not searched for in free text: replacing them would hide ordinary
  words. They are still hidden where a secret-looking name announces them.

The registry is process-wide because a secret is a fact about the process (its environment, its
options), and log filters must reach it without being handed state.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"
MIN_VALUE_LEN = 6
SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "passphrase",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "bearer",
    }
)
# A last word that makes the name a reference to a secret, not the secret itself.
# "<word> token" names a token of the vocabulary, not a credential.
VOCABULARY_TOKENS = frozenset(
    {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "first", "last", "stop"}
)
PLAIN_VALUES = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off"})

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
# The authority ends at the first '/', '?', '#' or space; the userinfo is everything up to its last '@'.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
# --flag=value or --flag value (the value is not itself a flag), -x value is left alone.
_FLAG = re.compile(r"(?P<flag>--[A-Za-z0-9][A-Za-z0-9_.-]*)(?P<sep>=|[ \t]+)(?P<value>(?!-)[^\s'\",]+)")
# NAME=value in text (an environment dump, a shell line).
_ASSIGN = re.compile(r"(?<![A-Za-z0-9_-])(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s'\",]+)")


def words(name: str) -> list[str]:
    """``--hf-token`` → ['hf', 'token']; ``apiKey`` → ['api', 'key']."""
    return [w.lower() for w in _WORD_SPLIT.split(_CAMEL.sub(r"\1_\2", name)) if w]


def is_secret_name(name: str) -> bool:
    """Does this flag, variable or key name hold a secret (see the module docstring)?"""
    ws = words(name)
    if not ws or ws[-1] not in SECRET_WORDS:
        return False
    return not (ws[-1] == "token" and len(ws) > 1 and ws[-2] in VOCABULARY_TOKENS)


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()

    def add(self, values: Iterable[str | None]) -> None:
        with self._lock:
            self._values.update(v for v in values if v and _searchable(v))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def values(self) -> list[str]:
        env = (v for k, v in os.environ.items() if is_secret_name(k) and _searchable(v))
        with self._lock:
            found = {*self._values, *env}
        return sorted(found, key=len, reverse=True)  # longest first: no partial leftovers


def _searchable(value: str) -> bool:
    v = value.strip()
    if len(v) < MIN_VALUE_LEN or v.lower() in PLAIN_VALUES:
        return False
    try:
        float(v)
    except ValueError:
        return True
    return False


_REGISTRY = _Registry()


def add_secrets(values: Iterable[str | None]) -> None:
    """Hide these values wherever they appear from now on (this process)."""
    _REGISTRY.add(values)


def clear_secrets() -> None:
    """Forget the registered values (tests); secret-looking environment variables still count."""
    _REGISTRY.clear()


def known_values() -> list[str]:
    return _REGISTRY.values()


def url_password(url: str | None) -> str | None:
    """The userinfo of a URL (``user:pw`` → ``pw``, a lone token as is), to register as a secret."""
    if not url:
        return None
    m = _URL_USERINFO.match(url.strip())
    if m is None:
        return None
    userinfo = url.strip()[len(m.group(1)) : m.end() - 1]
    return userinfo.partition(":")[2] or userinfo


def scrub_url(text: str) -> str:
    """``http://user:pass@host`` → ``http://***@host``."""
    return _URL_USERINFO.sub(rf"\1{REDACTED}@", text)


def strip_userinfo(url: str) -> str:
    """``http://user:pass@host/x`` → ``http://host/x``: a URL to hand on without its credentials."""
    return _URL_USERINFO.sub(r"\1", url)


def _flag_sub(m: re.Match[str]) -> str:
    if not is_secret_name(m.group("flag")):
        return m.group(0)
    return f"{m.group('flag')}{m.group('sep')}{REDACTED}"


def _assign_sub(m: re.Match[str]) -> str:
    if not is_secret_name(m.group("name")):
        return m.group(0)
    return f"{m.group('name')}={REDACTED}"


def text(value: str, extra: Iterable[str | None] = ()) -> str:
    """Any text bound for a file, a log, the terminal or MLflow, with every secret → ``***``."""
    if not value:
        return value
    values = {*known_values(), *(v for v in extra if v and _searchable(v))}
    return _text(value, sorted(values, key=len, reverse=True))


def _text(value: str, secrets: list[str]) -> str:
    out = value
    for secret in secrets:  # longest first: no partial leftovers
        if secret in out:
            out = out.replace(secret, REDACTED)
    out = scrub_url(out)
    out = _FLAG.sub(_flag_sub, out)
    return _ASSIGN.sub(_assign_sub, out)


def argv(args: Iterable[Any], extra: Iterable[str | None] = ()) -> list[str]:
    """An argv with the values of secret-looking flags hidden, in both ``--f v`` and ``--f=v`` forms."""
    out: list[str] = []
    hide_next = False
    for raw in args:
        a = str(raw)
        if hide_next and not a.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        flag, eq, _ = a.partition("=")
        if a.startswith("-") and is_secret_name(flag):
            if eq:
                out.append(f"{flag}={REDACTED}")
                continue
            hide_next = True
        out.append(text(a, extra))
    return out


def env(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Environment variables (or ``engine.env``) with the values of secret-looking names hidden."""
    return {k: (REDACTED if is_secret_name(k) else _value(v)) for k, v in variables.items()}


def engine_args(args: Mapping[str, Any] | list[Any]) -> Any:
    """The case's ``engine.args``: a mapping (keys are flag names) or a literal argv list."""
    if isinstance(args, Mapping):
        return {
            k: (REDACTED if is_secret_name(k) and v not in (True, False, None) else _value(v))
            for k, v in args.items()
        }
    return argv(args)


def _value(v: Any) -> Any:
    return text(v) if isinstance(v, str) else data(v)


def data(obj: Any) -> Any:
    """A JSON-like structure with every string passed through :func:`text` (keys are kept)."""
    secrets = known_values()  # once for the whole structure

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            return _text(o, secrets) if o else o
        if isinstance(o, Mapping):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def case_secrets(engine: Mapping[str, Any]) -> list[str]:
    """Secret values a case's engine section holds (``env``, ``args``, the URL's userinfo)."""
    found: list[str] = []
    for k, v in (engine.get("env") or {}).items():
        if is_secret_name(str(k)) and isinstance(v, str):
            found.append(v)
    args = engine.get("args") or {}
    if isinstance(args, Mapping):
        found += [str(v) for k, v in args.items() if is_secret_name(str(k)) and isinstance(v, (str, int))]
    else:
        items = [str(a) for a in args]
        for i, a in enumerate(items):
            flag, eq, value = a.partition("=")
            if a.startswith("-") and is_secret_name(flag):
                if eq:
                    found.append(value)
                elif i + 1 < len(items) and not items[i + 1].startswith("-"):
                    found.append(items[i + 1])
    found.append(url_password(engine.get("url")) or "")
    return [v for v in found if v]


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with :func:`text` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_text is None and record.exc_info[0] is not None:
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_FILTER = RedactingFilter()


def protect_loggers(root: str = "harness_fixtures") -> None:
    """Put the filter on ``root`` and every logger below it that exists now (idempotent).

    A logger's filter sees only records logged on that logger, not its children's, so each of the
    package's loggers gets one; then every handler (harness.log, pytest's captured logs) sees clean text.
    """
    names = [root, *(n for n in logging.root.manager.loggerDict if n.startswith(root + "."))]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
