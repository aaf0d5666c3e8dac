"""Benchmark cases as data: the pydantic models behind ``benchmarks/models/*.yaml``.

One YAML file describes one model: how to serve it (engine), what to send (dataset, generation),
which LoadGen model name each scenario uses, and the thresholds that gate it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EngineKind = str  # validated against the launcher registry, so a plugin can add kinds
Scenario = Literal["Offline", "Server", "Interactive", "SingleStream"]
SCENARIOS: tuple[Scenario, ...] = ("Offline", "Server", "Interactive", "SingleStream")

# MLPerf runs the Interactive benchmark as LoadGen's Server scenario with tighter limits.
LoadGenScenario = Literal["Offline", "Server", "SingleStream"]
LOADGEN_SCENARIO: dict[str, LoadGenScenario] = {
    "Offline": "Offline",
    "Server": "Server",
    "Interactive": "Server",
    "SingleStream": "SingleStream",
}


class ConfigError(ValueError):
    """A model YAML, user.conf or option value is wrong; the message says where and how to fix it."""


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_env(value: str, where: str = "") -> str:
    """``${VAR}``, ``$VAR`` and ``${VAR:-default}`` from the environment, then ``~``.

    :raises ConfigError: a variable without a default is unset (or empty); the message names it and
        ``where`` it was used, instead of a path that still contains ``${VAR}``.
    """

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        got = os.environ.get(name)
        if got:
            return got
        if m.group(2) is not None:
            return m.group(2)
        place = f" (used in {where}: {value!r})" if where else f" (used in {value!r})"
        raise ConfigError(
            f"{name} is not set{place}; export {name}=... or give a default as ${{{name}:-default}}"
        )

    return os.path.expanduser(_ENV_REF.sub(sub, value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSpec(_Strict):
    kind: EngineKind = Field(description="Launcher kind: vllm, sglang, trtllm, external or sim.")
    model: str = Field(
        "",
        description="Model path or id passed to the engine; ${VAR} and ~ are expanded. "
        "Empty for kind=sim/external.",
    )
    served_model_name: str | None = Field(
        None, description="Name the server answers to; defaults to the case name."
    )
    args: dict[str, Any] | list[str] = Field(
        default_factory=dict,
        description="Extra engine arguments: a mapping (--key value; true → bare flag, false → omitted) "
        "or a literal argv list.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the engine.")
    executable: str | None = Field(
        None, description="Engine executable or python; default from PATH / the prepared engine env."
    )
    host: str = Field("127.0.0.1", description="Interface the engine binds; loopback unless you need more.")
    url: str | None = Field(None, description="For kind=external: base URL of a running server.")
    urls: list[str] = Field(
        default_factory=list,
        description="For kind=external: base URLs of several running servers of the model, one SUT; "
        "each query goes to one of them (--harness-dispatch).",
    )
    replicas: int = Field(
        1,
        description="Engines of this case the suite starts, each on its own port; one LoadGen sends to "
        "all of them as one SUT.",
    )
    start_timeout_s: float = Field(900.0, gt=0, description="Deadline for the engine to become healthy.")
    stop_timeout_s: float = Field(20.0, gt=0, description="Grace after SIGTERM before SIGKILL.")
    prefix_caching: bool = Field(
        False, description="MLPerf forbids cross-query prefix caching; keep false for MLPerf cases."
    )
    sim: dict[str, Any] = Field(
        default_factory=dict, description="Simulator settings (kind=sim), see harness_fixtures.sim."
    )
    request_profile: Literal["vllm", "sglang", "trtllm"] | None = Field(
        None,
        description="Which server's request fields to send; default: the kind's (external and sim: vllm). "
        "Set it for a server you run (kind external or --harness-server-url) that is not vLLM.",
    )
    gpus: int | None = Field(
        None,
        gt=0,
        description="GPUs the engine needs from --harness-gpus; default: the product of its tensor, "
        "pipeline and data parallel sizes in args, else 1. Must equal that product when args give one.",
    )

    @model_validator(mode="after")
    def _gpus_match_parallelism(self) -> EngineSpec:
        layout = node_layout(self.kind, self.args)  # raises on a node the suite cannot start
        product = _parallel_product(self.args, layout)
        if self.gpus is None or product is None:
            return self
        if product != self.gpus:
            sizes = parallel_sizes(self.args)
            given = " × ".join(f"{flag} {size}" for flag, size in sizes.items())
            if layout is not None and layout.local_gpus:
                given += f" ({layout.how})"
            where = " on the head node" if layout is not None and layout.local_gpus else ""
            raise ValueError(
                f"engine.gpus is {self.gpus} but engine.args ask for {given} = {product} GPUs{where}; set "
                f"engine.gpus: {product} or change the parallel sizes so their product is {self.gpus}"
            )
        return self

    def gpu_count(self) -> int:
        """GPUs this engine is given under --harness-gpus (see ``gpus``): on a multi-node engine,
        those of the head, the node the suite starts."""
        if self.gpus is not None:
            return self.gpus
        return _parallel_product(self.args, node_layout(self.kind, self.args)) or 1

    def nodes(self) -> NodeLayout | None:
        """The engine's multi-node layout, from its flags (None: one node)."""
        return node_layout(self.kind, self.args)

    @model_validator(mode="after")
    def _replicas_and_urls(self) -> EngineSpec:
        if self.replicas < 1:
            raise ValueError(
                f"engine.replicas must be a whole number >= 1 (got {self.replicas!r}); use 1 for one engine"
            )
        if self.replicas > 1 and (self.kind == "external" or self.url or self.urls):
            raise ValueError(
                f"engine.replicas: {self.replicas} starts engines of this case, but the case names servers "
                "it does not start (kind external, url or urls); drop replicas, or list every running "
                "server in engine.urls"
            )
        if self.url and self.urls:
            raise ValueError("engine.url and engine.urls are both set; put every server in engine.urls")
        for u in self.urls:
            problem = url_problem(u)
            if problem:
                raise ValueError(f"engine.urls entry {u!r} {problem}")
        return self

    def endpoint_urls(self) -> list[str]:
        """The running servers this case names (engine.urls, else engine.url), or []."""
        return list(self.urls) or ([self.url] if self.url else [])


# The flags whose product is an engine's GPU count, as vLLM (--tensor-parallel-size, -tp ...), SGLang
# (--tp-size, --pp-size, --dp-size) and trtllm-serve (--tp_size, --pp_size) spell them.
_PARALLEL_FLAGS: dict[str, str] = {
    **dict.fromkeys(("tensor-parallel-size", "tp", "tp-size"), "tensor"),
    **dict.fromkeys(("pipeline-parallel-size", "pp", "pp-size"), "pipeline"),
    **dict.fromkeys(("data-parallel-size", "dp", "dp-size"), "data"),
}


def _arg_pairs(args: dict[str, Any] | list[str]) -> list[tuple[str, Any]]:
    """engine.args as (flag as written, value) pairs; a bare flag in an argv list has value True."""
    if isinstance(args, dict):
        return [(str(k), v) for k, v in args.items()]
    items = [str(a) for a in args]
    pairs: list[tuple[str, Any]] = []
    for k, item in enumerate(items):
        name, eq, value = item.partition("=")
        if not name.startswith("-"):
            continue
        if eq:
            pairs.append((name, value))
        elif k + 1 < len(items) and not items[k + 1].startswith("-"):
            pairs.append((name, items[k + 1]))
        else:
            pairs.append((name, True))
    return pairs


def _flag(key: str) -> str:
    """A flag's canonical name: no dashes in front, dashes inside (SGLang and vLLM accept both)."""
    return key.lstrip("-").replace("_", "-")


def parallel_sizes(args: dict[str, Any] | list[str]) -> dict[str, int]:
    """The parallel sizes engine.args set, by flag as written: ``{"--tensor-parallel-size": 2}``.

    :raises ValueError: a parallel size that is not a whole number >= 1.
    """
    sizes: dict[str, int] = {}
    for key, value in _arg_pairs(args):
        if _PARALLEL_FLAGS.get(_flag(key)) is None:
            continue
        flag = key if key.startswith("-") else "--" + key
        sizes[flag] = _whole(flag, value)
    return sizes


def _parallel_product(args: dict[str, Any] | list[str], layout: NodeLayout | None) -> int | None:
    """The GPUs the parallel sizes ask for on this node (None: args give no size)."""
    if layout is not None and layout.local_gpus is not None:
        return layout.local_gpus
    sizes = parallel_sizes(args)
    return math.prod(sizes.values()) if sizes else None


def _whole(flag: str, value: Any) -> int:
    try:
        size = int(str(value))
    except ValueError:
        size = 0
    if size < 1 or isinstance(value, bool):
        raise ValueError(f"engine.args {flag} is {value!r}; give a whole number >= 1")
    return size


@dataclass(frozen=True)
class NodeLayout:
    """An engine that spans machines, as its own flags describe it. The suite starts the head, the
    node that serves HTTP, and waits for it; the user starts the other nodes (docs: README, scaling)."""

    nodes: int | None  # machines the engine spans; None: Ray's cluster decides
    how: str  # which multi-node mode, in the engine's words
    rendezvous: str | None  # where the other nodes join the head
    others: str  # how the user starts the other nodes
    local_gpus: int | None  # GPUs of this node the head uses (its CUDA_VISIBLE_DEVICES), when known


def node_layout(kind: str, args: dict[str, Any] | list[str]) -> NodeLayout | None:
    """The multi-node layout engine.args ask for (None: one node).

    - SGLang: ``--nnodes N --node-rank 0 --dist-init-addr HOST:PORT``; tp × pp spread over N nodes.
    - vLLM, multiprocessing across nodes: ``--nnodes N --node-rank 0 --master-addr HOST``; the
      other nodes run ``--headless`` with their rank.
    - vLLM, data parallel across nodes: ``--data-parallel-size D --data-parallel-size-local L
      --data-parallel-address HOST``; the others run ``--headless --data-parallel-start-rank K``.
    - vLLM with ``--distributed-executor-backend ray``: Ray's cluster places the workers.

    :raises ValueError: the flags make this a node other than the head (which serves no HTTP), or
        leave out where the other nodes join; the message names the flag and the fix.
    """
    flags = {_flag(k): v for k, v in _arg_pairs(args)}
    sizes = parallel_sizes(args)
    world = math.prod(sizes.values())  # every parallel size
    model = math.prod(
        size for flag, size in sizes.items() if _PARALLEL_FLAGS[_flag(flag)] != "data"
    )  # one copy
    nnodes = _whole("--nnodes", flags["nnodes"]) if "nnodes" in flags else 1
    rank = flags.get("node-rank", 0)
    if nnodes > 1 and str(rank) != "0":
        raise ValueError(
            f"engine.args node-rank is {rank!r}: the suite starts the head (node rank 0), the node that "
            f"serves HTTP; start ranks 1..{nnodes - 1} yourself on the other nodes and drop node-rank here"
        )
    if kind == "sglang" and nnodes > 1:
        addr = _address(
            flags, "dist-init-addr", f"nnodes is {nnodes}", "the head's HOST:PORT, the same on every node"
        )
        return NodeLayout(
            nodes=nnodes,
            how=f"SGLang across {nnodes} nodes",
            rendezvous=str(addr),
            others=f"on each other node run the same launch_server command with --node-rank 1..{nnodes - 1}",
            local_gpus=_per_node(world, nnodes, "the parallel sizes"),
        )
    if kind != "vllm":
        return None
    if flags.get("headless") not in (None, False):
        raise ValueError(
            "engine.args headless: a headless vLLM serves no HTTP, so the suite cannot benchmark it; the "
            "suite starts the head, run the headless nodes yourself and drop headless here"
        )
    start = flags.get("data-parallel-start-rank", 0)
    if str(start) != "0":
        raise ValueError(
            f"engine.args data-parallel-start-rank is {start!r}: that is a node after the head; the suite "
            "starts the head (start rank 0), run the other nodes yourself and drop it here"
        )
    if nnodes > 1:
        addr = _address(flags, "master-addr", f"nnodes is {nnodes}", "the head's address, and master-port")
        return NodeLayout(
            nodes=nnodes,
            how=f"vLLM across {nnodes} nodes (multiprocessing)",
            rendezvous=f"{addr}:{flags['master-port']}" if "master-port" in flags else str(addr),
            others=f"on each other node run the same vllm serve command with --headless --node-rank "
            f"1..{nnodes - 1}",
            local_gpus=_per_node(world, nnodes, "the parallel sizes"),
        )
    dp = next((v for f, v in sizes.items() if _PARALLEL_FLAGS[_flag(f)] == "data"), 1)
    if "data-parallel-size-local" in flags:
        local = _whole("--data-parallel-size-local", flags["data-parallel-size-local"])
        if local < dp:
            addr = _address(
                flags,
                "data-parallel-address",
                f"data-parallel-size-local {local} < data-parallel-size {dp} spreads ranks over nodes",
                "the head's address",
            )
            port = flags.get("data-parallel-rpc-port")
            return NodeLayout(
                nodes=-(-dp // local),
                how=f"vLLM data parallel {dp} across nodes, {local} on the head",
                rendezvous=f"{addr}:{port}" if port else str(addr),
                others="on each other node run vllm serve with --headless, its own "
                "--data-parallel-size-local and --data-parallel-start-rank (the ranks before it)",
                local_gpus=model * local,
            )
    if str(flags.get("distributed-executor-backend", "")) == "ray":
        return NodeLayout(
            nodes=None,
            how="vLLM on a Ray cluster",
            rendezvous=None,
            others="start the Ray cluster first (ray start --head here, ray start --address=HEAD:6379 on "
            "each other node); Ray places vLLM's workers on its nodes",
            local_gpus=None,
        )
    return None


def _address(flags: dict[str, Any], key: str, because: str, what: str) -> str:
    """Where the other nodes join the head: required once the flags span nodes."""
    addr = flags.get(key)
    if not addr or addr is True:
        raise ValueError(
            f"engine.args {because}, but {key} is missing: give {what}, where the other nodes join"
        )
    return str(addr)


def _per_node(world: int, nodes: int, what: str) -> int:
    if world % nodes:
        raise ValueError(
            f"engine.args spread {what}, {world} GPUs, over nnodes {nodes}, which does not divide them; "
            "give sizes whose product is a multiple of nnodes"
        )
    return world // nodes


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a server's base URL (the first check, before any engine starts; the
    client's own parser checks the rest), or None."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url.strip())
        u.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        return f"is not a valid URL ({exc}); fix the host or port"
    if u.scheme.lower() not in ("http", "https") or not u.hostname:
        return "must look like http://host[:port][/path] or https://host[:port][/path]"
    return None


class DatasetSpec(_Strict):
    path: str = Field(description="Dataset file (MLPerf schema); relative paths are from the YAML file.")
    format: Literal["json", "pickle"] | None = Field(
        None, description="json (default) or pickle; a pickle runs code from the file when loaded."
    )
    input_column: str = Field("input", description="Raw text column.")
    tok_input_column: str = Field("tok_input", description="Prompt token ids column (what is sent).")
    output_column: str = Field("output", description="Reference output column (accuracy).")
    max_samples: int | None = Field(None, gt=0, description="Use only the first N samples.")
    performance_sample_count: int | None = Field(
        None, gt=0, description="QSL performance sample count; default: all loaded samples."
    )


class GenerationSpec(_Strict):
    api: Literal["completions", "chat"] = Field(
        "completions", description="completions sends tok_input ids; chat sends the input text."
    )
    max_tokens: int = Field(128, gt=0)
    min_tokens: int = Field(1, ge=0)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(42)
    ignore_eos: bool = Field(False)
    first_token_in_complete: bool = Field(
        True,
        description="Report ALL output tokens (including the first) in QuerySamplesComplete, "
        "as the MLCommons Llama reference does.",
    )
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Extra request fields.")
    eos_token_ids: list[int] = Field(
        default_factory=list, description="EOS ids, for the at-most-one-EOS output check (TEST06)."
    )
    count_tokens: Literal["auto", "token_ids", "usage"] = Field(
        "auto",
        description="How output tokens are counted: auto = token ids where the server streams them (vLLM; "
        "SGLang and TensorRT-LLM on completions), else usage.completion_tokens; usage = always usage "
        "(no ids: accuracy and output-consistency checks cannot run).",
    )


class Thresholds(_Strict):
    require_valid: bool = Field(True, description="Fail when LoadGen says INVALID.")
    max_failed_requests: int = Field(0, ge=0, description="Fail when more requests failed.")
    min_tokens_per_s: float | None = Field(None, description="Minimum output tokens/s.")
    min_samples_per_s: float | None = Field(None, description="Minimum completed samples/s.")
    max_ttft_p99_ms: float | None = Field(None, description="Maximum p99 time to first token (ms).")
    max_tpot_p99_ms: float | None = Field(None, description="Maximum p99 time per output token (ms).")
    max_client_cpu_bound_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Maximum fraction of samples with the client process at ≥ 90 % of a core.",
    )
    max_regression_pct: float = Field(5.0, ge=0, description="Allowed regression vs --harness-baseline (%).")
    max_regression_pct_per_metric: dict[str, float] = Field(
        default_factory=dict,
        description="Per-metric overrides of max_regression_pct, e.g. {ttft_p99_ms: 10}.",
    )


class LoadSpec(_Strict):
    """How the harness sizes a run's load when neither the command line nor user.conf sets it."""

    server_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Server/Interactive target QPS as this share of the model's measured Offline "
        "samples/s (the same session's Offline test, else a short Offline probe).",
    )
    probe_queries: int = Field(
        16, gt=0, description="Samples of the Offline probe run when the session has no Offline result."
    )


class AccuracySpec(_Strict):
    scenario: Scenario = Field("Offline", description="LoadGen scenario of the AccuracyOnly run.")
    target: str | dict[str, float] = Field(
        description="MLPerf target name (llama3_1-8b, llama3_1-8b-edge), a YAML file with rouge1, rouge2, "
        "rougeL, rougeLsum, gen_len (relative to the case file), or those keys inline."
    )
    min_ratio: float = Field(0.99, gt=0, le=1.5, description="Each ROUGE must reach this fraction of target.")
    gen_len_band: tuple[float, float] = Field((0.9, 1.1), description="gen_len must be within this band.")


class BenchmarkCase(_Strict):
    name: str = Field(description="Case id prefix: lowercase letters, digits and '_'.")
    description: str = ""
    engine: EngineSpec
    dataset: DatasetSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    loadgen_model: dict[Scenario, str] = Field(
        description="LoadGen model name per scenario (mlperf.conf/user.conf section)."
    )
    scenarios: list[Scenario] = Field(description="Scenarios this case runs.")
    user_conf: str | None = Field(None, description="user.conf for this case; default: the suite's.")
    tokenizer: str | None = Field(None, description="Tokenizer folder (accuracy decode); default: model.")
    thresholds: Thresholds = Field(default_factory=Thresholds)
    load: LoadSpec = Field(default_factory=LoadSpec, description="Load sizing from measurements.")
    accuracy: AccuracySpec | None = Field(
        None, description="Adds the test <name>_accuracy (LoadGen AccuracyOnly)."
    )
    source: str = Field("", description="File this case came from (filled in by the loader).")

    @field_validator("name")
    @classmethod
    def _name_is_an_id(cls, v: str) -> str:
        if not v or not all(c.islower() or c.isdigit() or c == "_" for c in v):
            raise ValueError(f"name {v!r} must be lowercase letters, digits and '_' (it becomes the test id)")
        return v

    @model_validator(mode="after")
    def _scenarios_have_names(self) -> BenchmarkCase:
        wanted = [*self.scenarios, *([self.accuracy.scenario] if self.accuracy else [])]
        missing = [s for s in wanted if s not in self.loadgen_model]
        if missing:
            raise ValueError(
                f"scenarios {missing} have no loadgen_model entry; add e.g. `{missing[0]}: llama3_1-8b`"
            )
        return self

    @property
    def served_name(self) -> str:
        return self.engine.served_model_name or self.name

    def resolve(self, value: str, key: str = "") -> Path:
        """A path from the YAML: env vars and ~ expanded, relative to the YAML's folder.

        :param key: the YAML key it came from, for the error message.
        :raises ConfigError: an environment variable it uses is unset.
        """
        where = f"{key} of {self.source or self.name}" if key else (self.source or self.name)
        p = Path(expand_env(value, where))
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p

    def engine_model(self) -> str:
        """``engine.model`` with env vars expanded: a local path (resolved like other paths) or a model id.

        :raises ConfigError: an environment variable it uses is unset.
        """
        model = self.engine.model
        if not model or model.startswith("builtin:"):
            return model
        expanded = expand_env(model, f"engine.model of {self.source or self.name}")
        if expanded.startswith(("/", ".")) or model.startswith(("~", ".")):
            return str(self.resolve(expanded))
        return expanded


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid benchmark case"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  {loc}: unknown key (typo?); allowed keys are listed in harness_fixtures/config.py"
            )
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_case(path: Path) -> BenchmarkCase:
    """Load and validate one model YAML; raise ConfigError naming the file and key."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data.setdefault("source", str(path.resolve()))
    try:
        return BenchmarkCase.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None


def load_cases(models_dir: Path) -> list[BenchmarkCase]:
    """All cases in a folder, sorted by name; names must be unique."""
    if not models_dir.is_dir():
        raise ConfigError(
            f"models folder {str(models_dir)!r} does not exist; set --harness-models-dir or the "
            "harness_models_dir ini key"
        )
    cases: list[BenchmarkCase] = []
    seen: dict[str, Path] = {}
    for path in sorted(models_dir.glob("*.yaml")) + sorted(models_dir.glob("*.yml")):
        case = load_case(path)
        if case.name in seen:
            raise ConfigError(f"{path}: case name {case.name!r} is also used by {seen[case.name]}")
        seen[case.name] = path
        cases.append(case)
    return sorted(cases, key=lambda c: c.name)


Mode = Literal["performance", "accuracy"]


@dataclass(frozen=True)
class PlannedRun:
    """One benchmark test: a case, a scenario, a LoadGen mode, and its id (built here only)."""

    case: BenchmarkCase
    scenario: Scenario
    mode: Mode
    test_id: str
    repeat: int | None = None  # with --harness-repeat N: 1..N

    @property
    def run_id(self) -> str:
        """The pytest id and folder name: the test id, with ``-r<k>`` for the k-th of repeated runs."""
        return self.test_id if self.repeat is None else f"{self.test_id}-r{self.repeat}"

    @property
    def loadgen_model(self) -> str:
        return self.case.loadgen_model[self.scenario]

    @property
    def loadgen_scenario(self) -> LoadGenScenario:
        return LOADGEN_SCENARIO[self.scenario]


def plan_runs(case: BenchmarkCase, global_mode: Mode = "performance") -> list[PlannedRun]:
    """The tests of a case, in the order they run: Offline first (its measured throughput sizes the
    Server load), then the other scenarios, then the accuracy test.

    Ids are ``<model>_<scenario>``; a case's accuracy test is ``<model>_accuracy``, so
    ``-k <model>_server`` still selects the performance run. ``--harness-mode accuracy`` runs every
    scenario in AccuracyOnly under its usual id.
    """
    runs = [
        PlannedRun(case, s, global_mode, f"{case.name}_{s.lower()}")
        for s in sorted(case.scenarios, key=SCENARIOS.index)
    ]
    if case.accuracy is not None and not (
        global_mode == "accuracy" and case.accuracy.scenario in case.scenarios
    ):
        runs.append(PlannedRun(case, case.accuracy.scenario, "accuracy", f"{case.name}_accuracy"))
    return runs


def shard_of(groups: dict[str, int], count: int) -> dict[str, int]:
    """Assign whole groups (a model's tests: one engine start) to ``count`` shards, numbered 1..count.

    Largest group first onto the shard with the fewest tests so far (ties: the lower shard number),
    groups of equal size by name: every node computes the same split from the same selection.
    """
    loads = [0] * count
    shard: dict[str, int] = {}
    for name, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        k = min(range(count), key=lambda i: (loads[i], i))
        loads[k] += n
        shard[name] = k + 1
    return shard
