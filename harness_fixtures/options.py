"""Every ``--harness-*`` option (and its ini key), parsed and validated once into :class:`HarnessOptions`.

The plugin registers the table :data:`OPTIONS` with pytest and builds the options in
``pytest_configure``; an :class:`OptionError` there becomes a ``pytest.UsageError`` before any engine
starts. Everything else receives the typed object: no domain module reads pytest's config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["str", "path", "float", "int", "bool", "workers", "rate", "list", "shard", "gpus"]


class OptionError(ValueError):
    """A bad option value; the message names the option, the value and the fix."""


@dataclass(frozen=True)
class Option:
    name: str  # without --harness-
    kind: Kind
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None
    positive: bool = False  # numbers must be > 0

    @property
    def dest(self) -> str:
        return "harness_" + self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return f"--harness-{self.name}"


OPTIONS: tuple[Option, ...] = (
    Option("models-dir", "path", "Folder of model YAML files.", "benchmarks/models"),
    Option("user-conf", "path", "LoadGen user.conf.", "benchmarks/user.conf"),
    Option("output-dir", "path", "Where each session writes a new folder of results.", "harness_output"),
    Option(
        "server-url",
        "list",
        "Benchmark a running OpenAI-compatible server instead of starting one; repeat it for several "
        "servers of the model, benchmarked as one SUT (ini: one per line).",
    ),
    Option(
        "dispatch",
        "str",
        "With several endpoints: how each query picks one (least-outstanding: fewest in flight).",
        "least-outstanding",
        choices=("least-outstanding", "round-robin"),
    ),
    Option(
        "api-key-env",
        "str",
        "Name of the env var holding a bearer token to send (its value is never written).",
    ),
    Option(
        "header",
        "list",
        "Extra request header NAME=VALUE on every request (stream, health check, /metrics); repeatable "
        "(ini: one per line). VALUE env:VAR reads $VAR; credentials must come that way.",
    ),
    Option(
        "ca-bundle",
        "path",
        "PEM file of the CAs to trust for https servers; unset: $SSL_CERT_FILE, else $REQUESTS_CA_BUNDLE, "
        "else the system's.",
    ),
    Option("client-cert", "path", "PEM client certificate (with its key, or see --harness-client-key)."),
    Option("client-key", "path", "PEM key of --harness-client-cert when it is a separate file."),
    Option("mode", "str", "LoadGen mode.", "performance", choices=("performance", "accuracy")),
    Option(
        "target-qps",
        "rate",
        "Server target QPS / Offline expected QPS / SingleStream 1 / expected latency; 'auto': the "
        "capacity last found for this model, engine and hardware (searched when there is none); unset: "
        "user.conf, else sized from this machine's measurement.",
        positive=True,
    ),
    Option(
        "find-capacity",
        "bool",
        "Server/Interactive: search the highest load that meets the latency limits with short probes, "
        "then run the test at it.",
    ),
    Option(
        "capacity-precision",
        "float",
        "Capacity search: stop at this relative precision, percent.",
        "5",
        positive=True,
    ),
    Option("capacity-max-probes", "int", "Capacity search: at most this many probes.", "8", positive=True),
    Option(
        "capacity-probe-queries",
        "int",
        "Capacity search: queries per probe; default: a tenth of the run's min_query_count, at least "
        "2 / (1 - percentile) (20 at p90, 200 at p99).",
        positive=True,
    ),
    Option(
        "capacity-probe-duration-ms",
        "int",
        "Capacity search: min_duration of a probe; default: a tenth of the run's.",
        positive=True,
    ),
    Option("min-duration-ms", "int", "Override LoadGen min_duration (ms)."),
    Option("min-query-count", "int", "Override LoadGen min_query_count."),
    Option("sample-count", "int", "Use only the first N dataset samples.", positive=True),
    Option(
        "request-timeout-s",
        "float",
        "Per-request deadline (s), from the moment the request is sent.",
        "600",
        positive=True,
    ),
    Option(
        "stream-idle-timeout-s",
        "float",
        "Fail a request whose answer started but then sent no byte for this long (s).",
        "120",
        positive=True,
    ),
    Option(
        "max-connections",
        "int",
        "Connections the client keeps open at most (per client process); raised file limits permitting.",
        "1024",
        positive=True,
    ),
    Option("test-timeout-s", "float", "Per-test deadline (s).", "7200", positive=True),
    Option("thresholds", "path", "YAML of threshold overrides: {case name or test id: {threshold: value}}."),
    Option("baseline", "path", "Compare against this baseline file (from --harness-save-baseline)."),
    Option("save-baseline", "path", "Write this session's results as a baseline file."),
    Option(
        "max-regression",
        "float",
        "Allowed regression vs the baseline, percent; unset: the case's thresholds.max_regression_pct (5).",
        positive=True,
    ),
    Option(
        "mlflow-uri", "str", "MLflow tracking URI for live logging (or $MLFLOW_TRACKING_URI); off when unset."
    ),
    Option("mlflow-experiment", "str", "MLflow experiment for live logging.", "harness-fixtures"),
    Option("skip-missing", "bool", "Skip (not fail) tests whose model or dataset is missing."),
    Option(
        "client-workers",
        "workers",
        "Client processes sending requests: 'auto' (one in-process client up to 400 QPS, then "
        "ceil(QPS/400) worker processes, at most cores-1) or a number (1: the in-process client).",
        "auto",
    ),
    Option(
        "allow-client-bound",
        "bool",
        "Do not fail a run whose client was the bottleneck (dispatch lag p99 > 10 ms, achieved < 95 "
        "percent of scheduled QPS, or a client process CPU-saturated); it is still reported.",
    ),
    Option(
        "repeat",
        "int",
        "Run each test N times (odd N, so the median is a run's value); the summary and compare "
        "report the median and spread.",
        "1",
        positive=True,
    ),
    Option(
        "submission-dir",
        "path",
        "Also write the session as an MLPerf inference submission tree into this folder; each "
        "performance test then also runs its scenario's accuracy run and compliance TEST06.",
    ),
    Option("submitter", "str", "Submitter (organization) name in the submission tree.", "unnamed"),
    Option(
        "submission-division", "str", "Division of the submission tree.", "open", choices=("closed", "open")
    ),
    Option(
        "system-name",
        "str",
        "System id in the submission tree (systems/<id>.json); unset: from the hardware, e.g. 8xH100-SXM.",
    ),
    Option(
        "shard",
        "shard",
        "Run shard I of N (I/N, e.g. 2/4) of the selected tests: whole models per shard, balanced by "
        "test count, the same split on every node (CI matrix jobs).",
    ),
    Option(
        "gpus",
        "gpus",
        "GPUs the suite may give its engines: a list of NVML indices or GPU UUIDs (0,1,2,3) or 'auto' "
        "(every GPU NVML sees). Each engine gets engine.gpus of them (one lock file per GPU, shared "
        "by xdist workers and concurrent sessions) as its CUDA_VISIBLE_DEVICES; unset: engines see "
        "what they see without the suite.",
    ),
    Option(
        "gpu-wait-s",
        "float",
        "How long an engine waits for free GPUs (held by other workers or sessions) before its tests "
        "fail (s).",
        "600",
        positive=True,
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}

# Where a raw value came from: the command line (paths relative to the invocation dir) or an ini
# file (relative to the rootdir); None when neither set it.
RawGetter = Callable[[Option], tuple[Any, Literal["cli", "ini"] | None]]


class HarnessOptions(BaseModel):
    """The suite's options, typed; defaults are the documented ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models_dir: Path | None = None
    models_dir_explicit: bool = False
    user_conf: Path | None = None
    user_conf_explicit: bool = False
    output_dir: Path = Path("harness_output")
    output_dir_explicit: bool = False
    server_url: str | None = Field(None, description="The first --harness-server-url.")
    server_urls: tuple[str, ...] = Field((), description="Every --harness-server-url, in order.")
    dispatch: Literal["least-outstanding", "round-robin"] = "least-outstanding"
    api_key_env: str | None = None
    headers: tuple[str, ...] = Field((), description="--harness-header values, NAME=VALUE each.")
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    mode: Literal["performance", "accuracy"] = "performance"
    target_qps: float | None = None
    target_qps_auto: bool = Field(False, description="--harness-target-qps auto.")
    find_capacity: bool = False
    capacity_precision_pct: float = 5.0
    capacity_max_probes: int = 8
    capacity_probe_queries: int | None = None
    capacity_probe_duration_ms: int | None = None
    min_duration_ms: int | None = None
    min_query_count: int | None = None
    sample_count: int | None = None
    request_timeout_s: float = 600.0
    stream_idle_timeout_s: float = 120.0
    max_connections: int = 1024
    test_timeout_s: float = 7200.0
    thresholds: Path | None = None
    baseline: Path | None = None
    save_baseline: Path | None = None
    max_regression_pct: float | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "harness-fixtures"
    skip_missing: bool = False
    client_workers: int | None = Field(None, description="None: auto.")
    allow_client_bound: bool = False
    repeat: int = 1
    submission_dir: Path | None = None
    submitter: str = "unnamed"
    submission_division: Literal["closed", "open"] = "open"
    system_name: str | None = None
    shard: tuple[int, int] | None = Field(None, description="--harness-shard I/N as (I, N), 1 <= I <= N.")
    gpus: tuple[str, ...] | None = Field(
        None, description="--harness-gpus: the entries as given (indices, UUIDs), or ('auto',)."
    )
    gpu_wait_s: float = 600.0

    def endpoint_urls(self) -> tuple[str, ...]:
        """Every --harness-server-url (an object built in code may set only ``server_url``)."""
        return self.server_urls or ((self.server_url,) if self.server_url else ())

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @classmethod
    def build(cls, raw: RawGetter, cli_dir: Path, root_dir: Path) -> HarnessOptions:
        """Parse every option once; raise OptionError naming the option, the value and the fix."""
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            value, source = raw(opt)
            if value in (None, "", []) or (opt.kind == "bool" and value is False):
                value, source = opt.default, None
            if value is None:
                continue
            field = _FIELD.get(opt.name, opt.dest[len("harness_") :])
            parsed = _parse(opt, value, source, cli_dir, root_dir)
            if parsed == "auto" and opt.kind == "rate":
                values[f"{field}_auto"] = True
                continue
            values[field] = parsed
            if opt.kind == "path":
                values[f"{field}_explicit"] = source == "cli"
        urls = values.pop("server_urls", ())
        if urls:
            values["server_urls"], values["server_url"] = urls, urls[0]
        if values.get("repeat", 1) % 2 == 0:
            raise OptionError(
                f"{_where(BY_NAME['repeat'])}: {values['repeat']!r} is even; pass an odd count (1, 3, 5 ...) "
                "so the median is one run's value"
            )
        if not values.get("mlflow_uri") and os.environ.get("MLFLOW_TRACKING_URI"):
            values["mlflow_uri"] = os.environ["MLFLOW_TRACKING_URI"]
        return cls(**{k: v for k, v in values.items() if k in cls.model_fields})


_FIELD = {
    "max-regression": "max_regression_pct",
    "capacity-precision": "capacity_precision_pct",
    "header": "headers",
    "server-url": "server_urls",
}


def _where(opt: Option) -> str:
    return f"{opt.flag} / ini {opt.dest}"


def _parse(opt: Option, value: Any, source: str | None, cli_dir: Path, root_dir: Path) -> Any:
    text = str(value).strip()
    if opt.kind == "bool":
        return bool(value)
    if opt.kind == "list":
        items = [value] if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    if opt.kind == "path":
        base = cli_dir if source == "cli" else root_dir
        return (base / os.path.expanduser(text)).resolve()
    if opt.kind == "shard":
        return _shard(opt, text)
    if opt.kind == "gpus":
        return _gpus(opt, text)
    if opt.kind == "rate" and text.lower() == "auto":
        return "auto"
    if opt.kind == "workers":
        if text.lower() == "auto":
            return None
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise OptionError(f"{_where(opt)}: {value!r} is not 'auto' or a count >= 1")
        return n
    if opt.kind in ("float", "int", "rate"):
        try:
            number: float | int = float(text) if opt.kind != "int" else int(text)
        except ValueError:
            want = {"float": "a number", "int": "a whole number", "rate": "a number or 'auto'"}[opt.kind]
            raise OptionError(f"{_where(opt)}: {value!r} is not {want}") from None
        if opt.positive and number <= 0:
            raise OptionError(f"{_where(opt)} must be > 0, got {value!r}")
        if opt.kind == "int" and number < 0:
            raise OptionError(f"{_where(opt)} must be >= 0, got {value!r}")
        return number
    if opt.choices and text not in opt.choices:
        raise OptionError(f"{_where(opt)}: {value!r} is not one of {list(opt.choices)}")
    return text


def _shard(opt: Option, text: str) -> tuple[int, int]:
    fix = "pass I/N with whole numbers 1 <= I <= N, e.g. 1/4 for the first of four CI jobs"
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise OptionError(f"{_where(opt)}: {text!r} is not I/N; {fix}") from None
    if not slash or n < 1 or not 1 <= i <= n:
        raise OptionError(f"{_where(opt)}: {text!r} is out of range; {fix}")
    return i, n


_UUID_PREFIXES = ("GPU-", "MIG-")


def _gpus(opt: Option, text: str) -> tuple[str, ...]:
    """Syntax only: whether each GPU exists is checked against NVML by the engine layer."""
    fix = (
        "pass 'auto' or a comma-separated list of NVML indices (as nvidia-smi numbers them) or GPU "
        "UUIDs, e.g. --harness-gpus 0,1,2,3"
    )
    if text.lower() == "auto":
        return ("auto",)
    entries = [e.strip() for e in text.split(",")]
    if not text or any(not e for e in entries):
        raise OptionError(f"{_where(opt)}: {text!r} has an empty entry; {fix}")
    for e in entries:
        if not (e.isdigit() or e.upper().startswith(_UUID_PREFIXES)):
            raise OptionError(f"{_where(opt)}: {e!r} in {text!r} is neither an index nor a GPU UUID; {fix}")
    seen = [e.lower() for e in entries]
    dup = next((e for k, e in enumerate(entries) if seen[k] in seen[:k]), None)
    if dup is not None:
        raise OptionError(f"{_where(opt)}: {dup!r} appears twice in {text!r}; name each GPU once")
    return tuple(entries)


def check_output_root(root: Path) -> None:
    """OptionError unless ``root`` is, or can be created as, a writable folder; creates nothing."""
    fix = "pass --harness-output-dir DIR (a writable folder) or set the harness_output_dir ini key"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    what = "" if existing == root else f"cannot be created: {str(existing)!r} "
    if not existing.is_dir():
        raise OptionError(f"output dir {str(root)!r} {what}is not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"output dir {str(root)!r} {what}is not writable; {fix}")


def check_writable_file(path: Path, option: str) -> None:
    """OptionError unless a file can be written at ``path`` (its folder exists or can be created,
    and is writable; ``path`` is not a folder); creates nothing."""
    fix = f"pass {option} a file path in a writable folder"
    if path.is_dir():
        raise OptionError(f"{option} {str(path)!r} is a directory; {fix}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"{option} {str(path)!r}: {str(existing)!r} is not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"{option} {str(path)!r} is not writable; {fix}")
