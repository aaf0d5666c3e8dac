"""The built-in LLM server simulator (engine ``kind: sim``), run as a subprocess like a real engine:

    python -m harness_fixtures.sim --host 127.0.0.1 --port P --served-model-name NAME [--config FILE.json]

It speaks vLLM's OpenAI API shape (``return_token_ids``, usage chunk, ``[DONE]``), models TTFT / ITL and a
FIFO batch of ``max_batch``, exposes vLLM's ``/metrics`` names, keeps server-side per-request truth at
``GET /sim/requests`` (``POST /sim/reset`` clears it), answers the ``CUDA_VISIBLE_DEVICES`` it was
started with at ``GET /sim/env`` (and prints it at start-up), and injects faults on request; see
:class:`SimSettings` for every knob.
"""

from __future__ import annotations

from harness_fixtures.sim.settings import SimSettings, SimSettingsError

__all__ = ["SimSettings", "SimSettingsError"]
