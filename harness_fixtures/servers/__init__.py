"""Engine launchers behind one registry; ``pytest_harness_make_launcher`` can add kinds."""

from .base import Endpoint, EngineError, LaunchContext, Launcher, log_tail
from .launchers import LAUNCHERS

__all__ = ["LAUNCHERS", "Endpoint", "EngineError", "LaunchContext", "Launcher", "log_tail"]
