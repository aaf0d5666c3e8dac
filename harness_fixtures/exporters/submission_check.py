"""A structural check of an MLPerf inference submission tree, written from the rules of MLCommons'
submission checker (mlcommons/inference ``tools/submission``, layout of v6.0 and later) and of
compliance TEST06; docs/submission.md lists them. It does not import the code that writes trees.

Three kinds of findings:

- **errors**: the checker would reject the tree (a missing file or field, an INVALID or erroring
  LoadGen log, a failed TEST06, accuracy below target in the closed division);
- **to fill in**: required fields the harness cannot know (storage, networking, cooling ...), empty;
- **notes**: rules of a closed submission this run does not meet (600 s minimum duration, an
  untruncated accuracy log, a benchmark name MLPerf does not have).

``python -m harness_fixtures.exporters.submission_check DIR`` prints them; exit status 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIVISIONS = ("closed", "open", "network")
SCENARIOS = ("Offline", "Server", "Interactive", "SingleStream", "MultiStream")
PERF_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt")
ACCURACY_FILES = (
    "accuracy.txt",
    "mlperf_log_accuracy.json",
    "mlperf_log_detail.txt",
    "mlperf_log_summary.txt",
)
SCENARIO_FILES = ("measurements.json", "user.conf", "README.md")
MEASUREMENT_FIELDS = (
    "input_data_types",
    "retraining",
    "starting_weights_filename",
    "weight_data_types",
    "weight_transformations",
)
SYSTEM_REQUIRED = (
    "division", "submitter", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_memory_capacity",
    "host_storage_capacity", "host_storage_type", "accelerators_per_node", "accelerator_model_name",
    "accelerator_memory_capacity", "framework", "operating_system", "system_type",
    "other_software_stack", "host_processor_frequency", "host_processor_caches",
    "host_memory_configuration", "host_processor_interconnect", "host_networking",
    "host_networking_topology", "accelerator_frequency", "accelerator_host_interconnect",
    "accelerator_interconnect", "accelerator_interconnect_topology", "accelerator_memory_configuration",
    "accelerator_on-chip_memories", "cooling", "hw_notes", "sw_notes", "host_network_card_count",
    "system_type_detail",
)  # fmt: skip
# Required fields that must also hold a meaningful (non-empty) answer.
SYSTEM_MEANINGFUL = (
    "division", "submitter", "system_type", "status", "system_name", "number_of_nodes",
    "host_processor_model_name", "host_processors_per_node", "host_processor_core_count",
    "host_memory_capacity", "host_memory_configuration", "host_storage_capacity", "host_storage_type",
    "host_networking", "host_network_card_count", "host_networking_topology", "accelerators_per_node",
    "accelerator_model_name", "accelerator_memory_capacity", "accelerator_host_interconnect",
    "accelerator_memory_configuration", "accelerator_interconnect", "cooling", "framework",
    "operating_system", "other_software_stack",
)  # fmt: skip
STATUSES = ("available", "preview", "rdi")
SYSTEM_TYPES = ("datacenter", "edge", "datacenter,edge", "edge,datacenter")
# Benchmarks whose compliance includes TEST06 (the LLMs), and the accuracy targets of Llama 3.1 8B:
# each ROUGE at >= 99 % of the reference, gen_len within 90-110 %.
TEST06_BENCHMARKS = ("llama3.1-8b", "llama3.1-8b-interactive", "llama2-70b-99.9", "deepseek-r1")
LLAMA_TARGETS: dict[str, dict[str, float]] = {
    "llama3.1-8b": {
        "rouge1": 38.7792, "rouge2": 15.9075, "rougeL": 24.4957, "rougeLsum": 35.793, "gen_len": 8167644
    },
    "llama3.1-8b-edge": {
        "rouge1": 39.06, "rouge2": 16.1147, "rougeL": 24.6375, "rougeLsum": 36.124, "gen_len": 3051113
    },
}  # fmt: skip
KNOWN_BENCHMARKS = (
    "resnet", "bert-99", "bert-99.9", "3d-unet-99", "3d-unet-99.9", "llama3.1-8b", "llama3.1-8b-edge",
    "llama2-70b-99.9", "stable-diffusion-xl", "rgat", "deepseek-r1", "whisper", "gpt-oss-120b",
    "llama3.1-405b", "mixtral-8x7b", "dlrm-v3",
)  # fmt: skip
MAX_ACCURACY_LOG_BYTES = 10 * 1024
MIN_DURATION_MS = 600_000
MLLOG = ":::MLLOG "
UNCOMMITTED = "Loadgen built with uncommitted changes"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # the scenario folders looked at

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.checked)

    def text(self) -> str:
        lines = [
            f"checked {len(self.checked)} result folder(s): {len(self.errors)} error(s), "
            f"{len(self.todo)} field(s) to fill in, {len(self.notes)} note(s)"
        ]
        for title, items in (("error", self.errors), ("to fill in", self.todo), ("note", self.notes)):
            lines += [f"  {title}: {item}" for item in items]
        return "\n".join(lines)


def _mllog(path: Path) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    errors: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(MLLOG):
            continue
        try:
            rec = json.loads(line[len(MLLOG) :])
        except json.JSONDecodeError:
            continue
        values[str(rec.get("key"))] = rec.get("value")
        if (rec.get("metadata") or {}).get("is_error"):
            errors.append(str(rec.get("value")))
    return values, errors


def _json(path: Path, report: Report) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        report.errors.append(f"{path}: not readable JSON ({exc})")
        return None


def _missing(folder: Path, names: tuple[str, ...], report: Report, what: str) -> bool:
    gone = [n for n in names if not (folder / n).is_file() or (folder / n).stat().st_size == 0]
    if gone:
        report.errors.append(f"{folder}: {what} needs {', '.join(gone)} (missing or empty)")
    return bool(gone)


def _check_system(path: Path, division: str, submitter: str, report: Report) -> None:
    doc = _json(path, report) if path.is_file() else None
    if not path.is_file():
        report.errors.append(f"{path}: the system description is missing")
    if not isinstance(doc, dict):
        return
    for key in SYSTEM_REQUIRED:
        if key not in doc:
            report.errors.append(f"{path}: field {key!r} is missing")
        elif key in SYSTEM_MEANINGFUL and doc[key] in ("", None):
            report.todo.append(f"{path.name}: {key}")
    if str(doc.get("division", "")).lower() != division:
        report.errors.append(f"{path}: division {doc.get('division')!r} but the folder is {division!r}")
    if str(doc.get("submitter", "")).lower() != submitter.lower():
        report.errors.append(f"{path}: submitter {doc.get('submitter')!r} but the folder is {submitter!r}")
    if doc.get("system_type") not in SYSTEM_TYPES:
        report.errors.append(f"{path}: system_type {doc.get('system_type')!r} is not one of {SYSTEM_TYPES}")
    status = str(doc.get("status") or "").lower()
    if status and status not in STATUSES:
        report.errors.append(f"{path}: status {doc.get('status')!r} is not one of {STATUSES}")
    network = str(doc.get("is_network", "false")).lower() == "true"
    if division in ("closed", "network") and network != (division == "network"):
        report.errors.append(
            f"{path}: is_network {doc.get('is_network')!r} does not fit division {division!r}"
        )


def _check_performance(folder: Path, scenario: str, report: Report) -> None:
    run = folder / "performance" / "run_1"
    if _missing(run, PERF_FILES, report, "the performance run"):
        return
    values, errors = _mllog(run / "mlperf_log_detail.txt")
    for e in errors:
        (report.notes if UNCOMMITTED in e else report.errors).append(f"{run}: LoadGen error: {e}")
    if values.get("result_validity") != "VALID":
        report.errors.append(f"{run}: LoadGen's result is {values.get('result_validity')!r}, not VALID")
    lg_scenario = values.get("effective_scenario")
    expected = "Server" if scenario == "Interactive" else scenario
    if lg_scenario is not None and lg_scenario != expected:
        report.errors.append(f"{run}: LoadGen ran {lg_scenario!r} in the {scenario} folder")
    if values.get("effective_test_mode") not in (None, "PerformanceOnly"):
        report.errors.append(f"{run}: test mode {values.get('effective_test_mode')!r}, not PerformanceOnly")
    duration = values.get("effective_min_duration_ms")
    if isinstance(duration, (int, float)) and duration < MIN_DURATION_MS:
        report.notes.append(f"{run}: min_duration {duration} ms < {MIN_DURATION_MS} ms required in closed")


def _check_accuracy(folder: Path, benchmark: str, division: str, report: Report) -> None:
    acc = folder / "accuracy"
    if not acc.is_dir():
        report.errors.append(f"{acc}: the accuracy run is missing")
        return
    if _missing(acc, ACCURACY_FILES, report, "the accuracy run"):
        return
    text = (acc / "accuracy.txt").read_text(errors="replace")
    if not re.search(r"^hash=[\w\d]+$", text, re.M):
        report.errors.append(f"{acc / 'accuracy.txt'}: no hash= line")
    _, errors = _mllog(acc / "mlperf_log_detail.txt")
    for e in errors:
        (report.notes if UNCOMMITTED in e else report.errors).append(f"{acc}: LoadGen error: {e}")
    if (acc / "mlperf_log_accuracy.json").stat().st_size > MAX_ACCURACY_LOG_BYTES:
        report.notes.append(
            f"{acc / 'mlperf_log_accuracy.json'}: larger than 10 KiB; truncate it with MLCommons' "
            "truncate_accuracy_log.py before submitting"
        )
    target = LLAMA_TARGETS.get(benchmark)
    if target is None:
        return
    got: dict[str, float] = {}
    for key in target:
        m = re.search(rf"'{key}':\s+'?([\d.]+)'?", text)
        if m is None:
            report.errors.append(f"{acc / 'accuracy.txt'}: no {key} value")
        else:
            got[key] = float(m.group(1))
    shortfalls = [
        f"{k} {v} < {0.99 * target[k]:.4f}" for k, v in got.items() if k != "gen_len" and v < 0.99 * target[k]
    ]
    if "gen_len" in got and not 0.9 * target["gen_len"] <= got["gen_len"] <= 1.1 * target["gen_len"]:
        shortfalls.append(f"gen_len {got['gen_len']:.0f} outside 90-110 % of {target['gen_len']:.0f}")
    for s in shortfalls:
        (report.errors if division == "closed" else report.notes).append(f"{acc}: accuracy {s}")


def _ids(hex_data: str) -> list[int]:
    raw = bytes.fromhex(hex_data)
    return [int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, len(raw), 4)]


def _check_test06(folder: Path, scenario: str, report: Report) -> None:
    t06 = folder / "TEST06"
    verify = t06 / "verify_accuracy.txt"
    if not verify.is_file():
        report.errors.append(f"{verify}: TEST06 verification is missing")
        return
    lines = [line.strip() for line in verify.read_text(errors="replace").splitlines()]
    first_ok = "First token check pass: True" in lines or "First token check pass: Skipped" in lines
    for ok, what in (
        (first_ok, "first token"),
        ("EOS check pass: True" in lines, "EOS"),
        ("Sample length check pass: True" in lines, "sample length"),
    ):
        if not ok:
            report.errors.append(f"{verify}: TEST06 {what} check did not pass")
    log = t06 / "accuracy" / "mlperf_log_accuracy.json"
    entries = _json(log, report) if log.is_file() else None
    if not log.is_file():
        report.errors.append(f"{log}: TEST06's accuracy log is missing")
    if not isinstance(entries, list):
        return
    if not entries:
        report.errors.append(f"{log}: TEST06 logged no answers")
    # Two of the three rules need nothing but the log: check them again here.
    for e in entries:
        data = _ids(str(e.get("data", "")))
        if int(e.get("token_count", -1)) != len(data):
            report.errors.append(f"{log}: seq_id {e.get('seq_id')}: token_count != length of the answer")
            break
        if scenario != "Offline":
            first = _ids(str(e.get("token_data", "")))
            if not first or not data or first[0] != data[0]:
                report.errors.append(f"{log}: seq_id {e.get('seq_id')}: first token != the answer's")
                break


def check_submission(root: Path) -> Report:
    """Check every ``<division>/<submitter>`` tree under ``root``."""
    report = Report()
    divisions = [d for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    if not divisions:
        report.errors.append(f"{root}: no division folder ({', '.join(DIVISIONS)})")
    for div in divisions:
        if div.name not in DIVISIONS:
            report.errors.append(f"{div}: not a division ({', '.join(DIVISIONS)})")
            continue
        for sub in sorted(p for p in div.iterdir() if p.is_dir()):
            for needed in ("results", "systems", "src"):
                if not (sub / needed).is_dir():
                    report.errors.append(f"{sub}: the {needed}/ folder is missing")
            for system in sorted(p for p in (sub / "results").glob("*") if p.is_dir()):
                _check_system(sub / "systems" / f"{system.name}.json", div.name, sub.name, report)
                for bench in sorted(p for p in system.iterdir() if p.is_dir()):
                    if bench.name not in KNOWN_BENCHMARKS:
                        report.notes.append(
                            f"{bench}: {bench.name!r} is not an MLPerf benchmark; an open submission maps "
                            "it to one in model_mapping.json"
                        )
                    for scen in sorted(p for p in bench.iterdir() if p.is_dir()):
                        _check_scenario(scen, bench.name, div.name, report)
    return report


def _check_scenario(folder: Path, benchmark: str, division: str, report: Report) -> None:
    report.checked.append(str(folder))
    if folder.name not in SCENARIOS:
        report.errors.append(f"{folder}: {folder.name!r} is not a scenario ({', '.join(SCENARIOS)})")
        return
    _missing(folder, SCENARIO_FILES, report, "the result")
    m = folder / "measurements.json"
    doc = _json(m, report) if m.is_file() else None
    if isinstance(doc, dict):
        for key in MEASUREMENT_FIELDS:
            if key not in doc:
                report.errors.append(f"{m}: field {key!r} is missing")
            elif not doc[key]:
                report.todo.append(f"{folder.relative_to(folder.parents[3])}/measurements.json: {key}")
    _check_performance(folder, folder.name, report)
    _check_accuracy(folder, benchmark, division, report)
    needs_test06 = division == "closed" and (
        benchmark in TEST06_BENCHMARKS or f"{benchmark}-{folder.name.lower()}" in TEST06_BENCHMARKS
    )
    if needs_test06 or (folder / "TEST06").exists():
        _check_test06(folder, folder.name, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="harness-submission-check",
        description="Check an MLPerf inference submission tree's structure and its TEST06 runs.",
    )
    p.add_argument("root", type=Path, help="The folder holding closed/ and/or open/.")
    args = p.parse_args(argv)
    report = check_submission(args.root)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
