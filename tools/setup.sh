#!/usr/bin/env bash
# Installs everything nchains needs into the current Python and builds the extension.
# Idempotent: a second run only re-checks. Used by `make demo`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian's Fashion-MNIST: only tools/train_default.py and the dataset tests read it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] apt-get install dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "[setup] warning: could not install dataset-fashion-mnist (only training the default model needs it)"
fi

# cmake and g++ build tools/cpp_client (the libtorch client test).
if { ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  echo "[setup] apt-get install cmake g++"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null) \
    || echo "[setup] warning: could not install cmake/g++ (only the C++ client test needs them)"
fi

# Debian's chromium renders `nchains report` pages to screenshots in tests/report (skipped without it);
# graphviz's dot draws `nchains ssa` graphs (matplotlib otherwise; the tests check both).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] apt-get install chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] warning: could not install chromium (only the report page tests need it)"
fi
if ! command -v dot >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] apt-get install graphviz"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
    || echo "[setup] warning: could not install graphviz (nchains ssa then draws with matplotlib)"
fi

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
  echo "[setup] pip install torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] pip install build and test requirements"
"$PY" -m pip install -q -r requirements-dev.txt
# CPU kernels only unless asked: no GPU on the project's machines, and nvcc would add ~10 minutes.
# NCHAINS_CUDA=1 make setup builds the CUDA kernels too (tools/check_cuda_build.sh proves they compile).
export NCHAINS_CUDA="${NCHAINS_CUDA:-0}"
echo "[setup] building nchains._C (NCHAINS_CUDA=$NCHAINS_CUDA)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import nchains, torch; print('[setup] nchains', nchains.__version__, 'torch', torch.__version__, 'CUDA kernels:', nchains.ops.cuda_available())"
