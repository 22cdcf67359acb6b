#!/usr/bin/env bash
# The main job end to end on the built-in defaults (grows with the pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
EK=.venv/bin/edgekit
$EK models
for m in r1-tiny v3-tiny; do
  $EK generate $m --prompt "Hello, edge" --max-new-tokens 8
done
