"""Errors of the client's request paths (the streaming client and the short GETs share them)."""

from __future__ import annotations


class HttpError(Exception):
    """The exchange failed below HTTP semantics: connection refused or lost, bad framing, deadline."""


class RequestTimeout(HttpError):
    """The request's deadline (or its idle timeout) passed before the response ended."""
