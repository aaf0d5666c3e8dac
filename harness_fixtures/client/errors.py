"""Errors of the client's request paths (the streaming client and the short GETs share them)."""

from __future__ import annotations


class HttpError(Exception):
    """The exchange failed below HTTP semantics: connection refused or lost, bad framing, deadline."""


class RequestTimeout(HttpError):
    """The request's deadline (or its idle timeout) passed before the response ended."""


class CertificateError(HttpError):
    """The server's TLS certificate is not trusted (or not for this name): asking again cannot help."""


CA_FIX = "pass the CA that signed it with --harness-ca-bundle (or SSL_CERT_FILE / REQUESTS_CA_BUNDLE)"
