"""Metrics collectors (engine /metrics, host, GPU) behind one protocol, the timeline file, plots.

Heavy optional dependencies (pynvml, matplotlib, prometheus_client, requests, psutil) are imported
only where used, so importing this package is cheap.
"""

from .base import BaseCollector, Collector, CollectorSet, Sample
from .host import HostCollector
from .nvml import NvmlCollector
from .prometheus import PrometheusCollector
from .timeline import Timeline, read_timeline, summarize, write_timeline

__all__ = [
    "BaseCollector",
    "Collector",
    "CollectorSet",
    "HostCollector",
    "NvmlCollector",
    "PrometheusCollector",
    "Sample",
    "Timeline",
    "read_timeline",
    "summarize",
    "write_timeline",
]
