"""A session's runs as an MLPerf inference submission tree (the layout the submission checker reads
since v6.0; docs/submission.md has the rules and where they were read).

::

    <out>/<division>/<submitter>/
      systems/<system>.json                  pre-filled from the environment capture; the rest to fill in
      src/README.md                          which code produced the results
      results/<system>/<benchmark>/<scenario>/
        performance/run_1/mlperf_log_{summary,detail}.txt
        accuracy/accuracy.txt mlperf_log_accuracy.json mlperf_log_{summary,detail}.txt
        TEST06/verify_accuracy.txt  TEST06/accuracy/mlperf_log_accuracy.json
        measurements.json  user.conf  README.md

Only files are read: ``python -m harness_fixtures.exporters.submission SESSION --out DIR`` exports
any session whose performance tests ran with ``--harness-submission-dir`` (TEST06 and accuracy runs).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..results import FINISHED, BenchmarkResult, Metadata

# LoadGen model name → MLPerf benchmark folder name (the checker's model_mapping). The interactive
# variant is the benchmark llama3.1-8b in the scenario folder Interactive.
BENCHMARK_OF = {
    "llama3_1-8b": "llama3.1-8b",
    "llama3_1-8b-interactive": "llama3.1-8b",
    "llama3_1-8b-edge": "llama3.1-8b-edge",
}
EDGE_BENCHMARKS = {"llama3.1-8b-edge"}
# Every key the checker requires in systems/<id>.json (SYSTEM_DESC_REQUIRED_FIELDS).
SYSTEM_FIELDS = (
    "division",
    "submitter",
    "status",
    "system_name",
    "number_of_nodes",
    "host_processor_model_name",
    "host_processors_per_node",
    "host_processor_core_count",
    "host_memory_capacity",
    "host_storage_capacity",
    "host_storage_type",
    "accelerators_per_node",
    "accelerator_model_name",
    "accelerator_memory_capacity",
    "framework",
    "operating_system",
    "system_type",
    "other_software_stack",
    "host_processor_frequency",
    "host_processor_caches",
    "host_memory_configuration",
    "host_processor_interconnect",
    "host_networking",
    "host_networking_topology",
    "accelerator_frequency",
    "accelerator_host_interconnect",
    "accelerator_interconnect",
    "accelerator_interconnect_topology",
    "accelerator_memory_configuration",
    "accelerator_on-chip_memories",
    "cooling",
    "hw_notes",
    "sw_notes",
    "host_network_card_count",
    "system_type_detail",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class SubmissionError(ValueError):
    """The session cannot be exported; the message says why and what to do."""


@dataclass(frozen=True)
class TestRun:
    """One test of a session as read from its folder."""

    dir: Path
    result: BenchmarkResult
    metadata: Metadata


def read_session(session: Path) -> list[TestRun]:
    """Every test of a session folder (``*/result.yaml`` with its metadata.yaml)."""
    runs = []
    for path in sorted(session.glob("*/result.yaml")):
        md = path.parent / "metadata.yaml"
        if md.is_file():
            runs.append(TestRun(path.parent, BenchmarkResult.load(path), Metadata.load(md)))
    return runs


def safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "unnamed"


def default_system_name(environment: dict[str, Any]) -> str:
    """``<n>x<GPU>`` (e.g. ``1xNVIDIA_H200``), else ``<cores>c_<CPU>`` from the environment capture."""
    gpus = [str(g.get("name")) for g in environment.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        return safe_name(f"{len(gpus)}x{gpus[0]}")
    cpu = environment.get("cpu") or {}
    return safe_name(f"{cpu.get('logical_cores') or 0}c_{cpu.get('model') or 'cpu'}")


def benchmark_of(loadgen_model: str) -> str:
    return BENCHMARK_OF.get(loadgen_model, loadgen_model)


def system_json(runs: Sequence[TestRun], system: str, division: str, submitter: str) -> dict[str, Any]:
    """systems/<system>.json: what the environment capture knows; every other required field empty
    (the submitter's to fill in: the harness cannot see storage, networking or cooling)."""
    md = runs[0].metadata
    env = md.environment
    cpu = env.get("cpu") or {}
    gpus = [g for g in env.get("gpus") or [] if isinstance(g, dict)]
    benchmarks = {benchmark_of(r.result.loadgen_model) for r in runs}
    edge = bool(benchmarks & EDGE_BENCHMARKS)
    types = ["datacenter"] * (not edge or bool(benchmarks - EDGE_BENCHMARKS)) + ["edge"] * edge
    engines = {(r.metadata.engine.kind, r.metadata.engine.version) for r in runs if r.metadata.engine}
    packages = env.get("packages") or {}
    stack = [f"Python {env.get('python')}"] + [
        f"{name} {packages[name]}" for name in ("harness-fixtures", "mlcommons-loadgen") if packages.get(name)
    ]
    doc: dict[str, Any] = dict.fromkeys(SYSTEM_FIELDS, "")
    doc.update(
        {
            "division": division,
            "submitter": submitter,
            "system_name": system,
            "number_of_nodes": 1,
            "host_processor_model_name": cpu.get("model") or "",
            "host_processor_core_count": cpu.get("physical_cores") or "",
            "host_memory_capacity": f"{env['memory_gib']} GiB" if env.get("memory_gib") else "",
            "accelerators_per_node": len(gpus),
            "accelerator_model_name": str(gpus[0].get("name")) if gpus else "N/A",
            "accelerator_memory_capacity": (
                f"{round(float(gpus[0]['memory_total_mib']) / 1024)} GiB"
                if gpus and gpus[0].get("memory_total_mib")
                else ("N/A" if not gpus else "")
            ),
            "accelerator_host_interconnect": "" if gpus else "N/A",
            "accelerator_interconnect": "" if gpus else "N/A",
            "accelerator_memory_configuration": "" if gpus else "N/A",
            "framework": ", ".join(f"{k} {v or '(version unknown)'}" for k, v in sorted(engines, key=str)),
            "operating_system": env.get("os") or "",
            "system_type": ",".join(types),
            "other_software_stack": ", ".join(stack),
            "sw_notes": "Measured with harness-fixtures (MLPerf LoadGen in pytest).",
            "is_network": "false",
        }
    )
    sut = getattr(md, "sut", None)
    if isinstance(sut, str) and sut.startswith("Network SUT"):
        # The load came over the network to servers elsewhere: MLPerf's Network division system.
        doc["is_network"] = "true"
        doc["sw_notes"] += f" {sut}."
    if gpus and gpus[0].get("driver_version"):
        doc["other_software_stack"] += (
            f", NVIDIA driver {gpus[0]['driver_version']}, CUDA {gpus[0].get('cuda_driver_version')}"
        )
    return doc


def measurements_json(run: TestRun) -> dict[str, str]:
    """measurements.json: what the case says; what only the submitter knows is left empty."""
    case = run.metadata.case
    engine = case.get("engine") or {}
    args: dict[str, Any] = engine["args"] if isinstance(engine.get("args"), dict) else {}
    api = (case.get("generation") or {}).get("api", "completions")
    return {
        "input_data_types": "int32" if api == "completions" else "text",
        "retraining": "No",
        "starting_weights_filename": str(engine.get("model") or ""),
        "weight_data_types": str(args.get("dtype") or ""),
        "weight_transformations": "",
    }


def readme(run: TestRun) -> str:
    md = run.metadata
    engine = md.engine
    git = md.environment.get("git") or {}
    lines = [
        f"# {run.result.test_id}: {run.result.loadgen_model} {run.result.scenario}",
        "",
        f"Measured with harness-fixtures (git {git.get('sha') or 'unknown'}"
        f"{', with uncommitted changes' if git.get('dirty') else ''}) from {md.started_utc} to "
        f"{md.finished_utc}.",
        "",
        "Command:",
        "",
        "```",
        shlex.join(md.command_line) or "(not recorded)",
        "```",
        "",
    ]
    if engine is not None:
        lines += [
            f"Engine: {engine.kind} {engine.version or ''} serving `{engine.served_model}`:",
            "",
            "```",
            shlex.join(engine.argv),
            "```",
            "",
        ]
    lines += [
        "LoadGen ran in a fresh process per run with this folder's user.conf over its built-in "
        "mlperf.conf; TEST06 ran with MLCommons' audit.config in its working directory.",
    ]
    return "\n".join(lines) + "\n"


def _copy(src: Path, dest: Path) -> None:
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def _pick(runs: list[TestRun]) -> TestRun:
    """Of several runs of one benchmark and scenario (--harness-repeat), the median by throughput."""
    ranked = sorted(runs, key=lambda r: r.result.samples_per_s or 0.0)
    return ranked[len(ranked) // 2]


def export_submission(
    session: Path,
    out: Path,
    submitter: str,
    division: str = "open",
    system: str | None = None,
) -> Path:
    """Write the session's finished performance runs into ``out`` as a submission tree.

    :returns: the submitter folder ``out/<division>/<submitter>``.
    :raises SubmissionError: no performance run of the session finished.
    """
    runs = [
        r for r in read_session(session) if r.result.mode == "performance" and r.result.status in FINISHED
    ]
    if not runs:
        raise SubmissionError(
            f"{session}: no finished performance test to export (a submission needs performance runs)"
        )
    system = safe_name(system or default_system_name(runs[0].metadata.environment))
    submitter_dir = out / division / safe_name(submitter)
    groups: dict[tuple[str, str], list[TestRun]] = {}
    for r in runs:
        groups.setdefault((benchmark_of(r.result.loadgen_model), r.result.scenario), []).append(r)
    for (benchmark, scenario), group in sorted(groups.items()):
        run = _pick(group)
        dest = submitter_dir / "results" / system / benchmark / scenario
        if dest.exists():
            shutil.rmtree(dest)  # an earlier export of the same system, benchmark and scenario
        src = run.dir
        for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
            _copy(src / "mlperf" / name, dest / "performance" / "run_1" / name)
        acc = src / "accuracy"
        if (acc / "accuracy.txt").is_file():
            _copy(acc / "accuracy.txt", dest / "accuracy" / "accuracy.txt")
            for name in ("mlperf_log_accuracy.json", "mlperf_log_detail.txt", "mlperf_log_summary.txt"):
                _copy(acc / "mlperf" / name, dest / "accuracy" / name)
        t06 = src / "TEST06"
        if (t06 / "verify_accuracy.txt").is_file():
            _copy(t06 / "verify_accuracy.txt", dest / "TEST06" / "verify_accuracy.txt")
            _copy(
                t06 / "mlperf" / "mlperf_log_accuracy.json",
                dest / "TEST06" / "accuracy" / "mlperf_log_accuracy.json",
            )
        _copy(src / "user.conf", dest / "user.conf")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "measurements.json").write_text(json.dumps(measurements_json(run), indent=4) + "\n")
        (dest / "README.md").write_text(readme(run))
    systems = submitter_dir / "systems"
    systems.mkdir(parents=True, exist_ok=True)
    (systems / f"{system}.json").write_text(
        json.dumps(system_json(runs, system, division, safe_name(submitter)), indent=4) + "\n"
    )
    src_dir = submitter_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    git = runs[0].metadata.environment.get("git") or {}
    (src_dir / "README.md").write_text(
        "# Code\n\nThe results were produced by harness-fixtures "
        f"(git {git.get('sha') or 'unknown'}) driving MLPerf LoadGen against the engine named in each "
        "result's README.md.\n"
    )
    return submitter_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m harness_fixtures.exporters.submission",
        description="Write a session's runs as an MLPerf inference submission tree, then check it.",
    )
    p.add_argument("session", type=Path, help="A session folder (harness_output/<stamp>).")
    p.add_argument("--out", type=Path, required=True, help="The submission folder to write into.")
    p.add_argument("--submitter", default="unnamed", help="Submitter (organization). Default: unnamed.")
    p.add_argument("--division", choices=("closed", "open"), default="open", help="Default: open.")
    p.add_argument("--system", help="System id. Default: from the session's hardware.")
    args = p.parse_args(argv)
    try:
        folder = export_submission(args.session, args.out, args.submitter, args.division, args.system)
    except (SubmissionError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .submission_check import check_submission

    report = check_submission(args.out)
    print(f"submission tree: {folder}")
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
