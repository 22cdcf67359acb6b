"""`edgekit profile` and `edgekit compare`: measure a model on the machine edgekit runs on, honestly.

One profile run = prefill of a seeded prompt (time to first token) + (new_tokens - 1) single-token
decode steps through the runner's KV-cache session, greedy; warm-up runs first, then the measured
runs. What is reported (field by field in README.md, "The profile report"):
- latency: TTFT and per-token decode latency with p50/p90/p99; decode tokens/s; requests/s at the batch (timing)
- memory: process RSS (baseline before the model is loaded, peak, peak over baseline); on CUDA also
  torch's max allocated / reserved (memory)
- gated models (R1, calibrate-skip Hugging Face models): the fraction of gated-layer executions skipped
  (one decision per call for the whole batch) (timing.gating)
- roofline: weight bytes read per decode step / memory bandwidth, and the measured decode tokens/s as a
  fraction of it (roofline)
- energy per token only where the device reports power (edgekit.telemetry), else null with the reason
- `--sweep-threshold`: the same measurement at several thresholds
- `--workload mixed`: seeded requests of mixed prompt lengths, batched "fixed" or "dynamic" (batching)
- `--plot`: a PNG of the above (plot)

`compare` runs each profile in a fresh Python process (`python -m edgekit.profiling`) (comparison).
The terminal rendering of both lives in the CLI (edgekit.cli.render).
"""

from edgekit.profiling.comparison import compare, comparison_rows, profile_isolated
from edgekit.profiling.measure import REPORT_VERSION, parse_thresholds, profile, write_json

__all__ = ["REPORT_VERSION", "compare", "comparison_rows", "parse_thresholds", "profile", "profile_isolated",
           "write_json"]
