#!/usr/bin/env bash
# The main job end to end on the built-in default model:
# list -> generate (PyTorch) -> export ONNX int8 (validated) -> generate (ONNX Runtime, two thresholds)
# -> plan for a Jetson -> profile here -> keygen/package/verify/install/run a signed bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
EK=.venv/bin/edgekit
MODEL=${EDGEKIT_DEMO_MODEL:-r1-ref}   # the trained reference R1 shipped in the package
OUT=${EDGEKIT_DEMO_OUT:-out/demo}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "models"
$EK models
step "generate with $MODEL in PyTorch"
$EK generate "$MODEL" --prompt "sort 83751=" --max-new-tokens 12
step "export $MODEL to ONNX, int8 (block int8 weights, int8 activations; validated against PyTorch)"
$EK export "$MODEL" --format onnx --int8 --out "$OUT/onnx-int8" --force
step "generate from the artifact in ONNX Runtime: gates open, then every gated layer skipped"
$EK generate "$OUT/onnx-int8" --prompt "sort 83751=" --max-new-tokens 12 --threshold 0
$EK generate "$OUT/onnx-int8" --prompt "sort 83751=" --max-new-tokens 12 --threshold 2
step "plan $MODEL and r1-8.5b for a Jetson Orin Nano 8GB (estimate)"
$EK plan "$MODEL" --device jetson-orin-nano-8gb --precision fp16
$EK plan r1-8.5b --device jetson-orin-nano-8gb || true   # does not fit: the plan says what would
step "profile the artifact on this machine"
$EK profile "$OUT/onnx-int8" --prompt-len 32 --new-tokens 16 --runs 3 --out "$OUT/profile.json"
step "package, verify, install and run a signed bundle"
[ -f "$OUT/keys/edgekit.key" ] || $EK keygen --out "$OUT/keys"
$EK package "$OUT/onnx-int8" --device cpu --sign-key "$OUT/keys/edgekit.key" --out "$OUT/$MODEL.tar.gz" --force
$EK verify "$OUT/$MODEL.tar.gz" --public-key "$OUT/keys/edgekit.pub"
$EK install "$OUT/$MODEL.tar.gz" --dest "$OUT/installed" --public-key "$OUT/keys/edgekit.pub" --force
$EK run "$OUT/installed" --public-key "$OUT/keys/edgekit.pub" --prompt "sort 83751=" --max-new-tokens 12
