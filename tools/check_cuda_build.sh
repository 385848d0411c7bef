#!/usr/bin/env bash
# Builds nchains._C with its CUDA kernels (csrc/cuda/*.cu) out of tree, then checks that
#   1. every op has a CUDA kernel registered, and
#   2. the CPU kernels of that same library still agree with nchains/ops/_reference.py.
# No GPU is needed (or used): the CUDA kernels are compiled and registered, never run.
# The in-tree CPU build (nchains/_C*.so) is left untouched.
#
# Usage: tools/check_cuda_build.sh [BUILD_DIR]     (default /tmp/nchains-cuda-build)
# Env:   CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), PYTHON.
set -uo pipefail

BUILD_DIR="${1:-/tmp/nchains-cuda-build}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export NCHAINS_CUDA=1

fail() {
  echo "FAIL: check_cuda_build: $*"
  exit 1
}

cd "$ROOT" || fail "cannot cd to $ROOT"
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"

mkdir -p "$BUILD_DIR" || fail "cannot create $BUILD_DIR"
echo "== building CUDA extension into $BUILD_DIR (arch $TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
"$PYTHON" setup.py build_ext --build-temp "$BUILD_DIR/temp" --build-lib "$BUILD_DIR/lib" \
  >"$BUILD_DIR/build.log" 2>&1
status=$?
echo "== build took $(( $(date +%s) - start ))s (log: $BUILD_DIR/build.log)"
if [ $status -ne 0 ]; then
  grep -E "error|Error" "$BUILD_DIR/build.log" | head -40
  fail "build failed (exit $status), see $BUILD_DIR/build.log"
fi
LIB="$(ls "$BUILD_DIR"/lib/nchains/_C*.so 2>/dev/null | head -1)"
[ -n "$LIB" ] || fail "no nchains/_C*.so under $BUILD_DIR/lib"
# build_ext without --inplace must leave the in-tree (CPU) extension alone. Compare contents, not
# timestamps: a concurrent CPU rebuild of the in-tree library is not this script's doing.
for f in nchains/_C*.so; do
  [ -e "$f" ] && cmp -s "$f" "$LIB" && fail "the in-tree $f is the CUDA build; it must not be overwritten"
done

"$PYTHON" - "$LIB" "$ROOT/nchains/ops/_reference.py" <<'PY'
import importlib.util
import sys

import torch

lib, ref_path = sys.argv[1], sys.argv[2]
# Load the library directly; importing the nchains package would also load the in-tree _C and
# register the nchains namespace twice.
torch.ops.load_library(lib)
spec = importlib.util.spec_from_file_location("nchains_reference", ref_path)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

ops = ["masked_conv2d", "_masked_conv2d", "_masked_conv2d_backward", "gate", "_gate_backward",
       "taylor_contributions", "_taylor_contributions_backward"]
registered = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"nchains::{op}", "CUDA") for op in ops}
print("CUDA kernels registered:", registered)
missing = [op for op, ok in registered.items() if not ok]
if missing:
    print("FAIL: check_cuda_build: no CUDA kernel for", ", ".join(missing))
    sys.exit(1)
cpu_missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nchains::{op}", "CPU")]
if cpu_missing:
    print("FAIL: check_cuda_build: no CPU kernel for", ", ".join(cpu_missing))
    sys.exit(1)

# CPU sanity: the CUDA-enabled library must still compute the reference semantics on the CPU.
torch.manual_seed(0)
nc = torch.ops.nchains
failures = []


def check(name, got, want, **tol):
    try:
        torch.testing.assert_close(got, want, **tol)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0]}")


for dtype in (torch.float32, torch.float64):
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        y = torch.randn(2, 5, 6, 7, dtype=dtype).contiguous(memory_format=fmt)
        x = torch.randn(2, 5, 6, 7, dtype=dtype).contiguous(memory_format=fmt)
        alpha = torch.tensor(0.3, dtype=dtype)
        tag = f"{dtype}, {'channels_last' if cl else 'contiguous'}"
        out = nc.gate(y, x, alpha, 0.2)
        check(f"gate ({tag})", out, ref.gate(y, x, alpha, 0.2))
        if out.is_contiguous(memory_format=fmt) is False:
            failures.append(f"gate ({tag}): output layout changed")
        go = torch.randn_like(y)
        yr, xr, ar = (t.detach().clone().requires_grad_() for t in (y, x, alpha))
        torch.autograd.backward(ref.gate(yr, xr, ar, 0.2), go)
        gy, gx, ga = nc._gate_backward(go, y, x, alpha, 0.2)
        check(f"_gate_backward ({tag})", (gy, gx, ga), (yr.grad, xr.grad, ar.grad))
        for absolute in (False, True):
            for red in ("channel", "none"):
                check(f"taylor_contributions ({tag}, {red}, abs={absolute})",
                      nc.taylor_contributions(y, x, red, absolute),
                      ref.taylor_contributions(y, x, reduction=red, absolute=absolute))
        w = torch.randn(5, 5, 3, 3, dtype=dtype)
        s = torch.rand(5, dtype=dtype)
        b = torch.randn(5, dtype=dtype)
        for act in ("none", "relu"):
            for gate_logit in (None, alpha):
                check(f"masked_conv2d ({tag}, {act}, gated={gate_logit is not None})",
                      nc.masked_conv2d(x, w, b, s, [1, 1], [1, 1], [1, 1], 1, act, gate_logit, 0.2),
                      ref.masked_conv2d(x, w, b, s, padding=1, activation=act, gate_logit=gate_logit),
                      rtol=1e-4, atol=1e-4)

if failures:
    print("FAIL: check_cuda_build: CPU kernels of the CUDA build disagree with the reference:")
    for f in failures:
        print("  -", f)
    sys.exit(1)
print("CPU sanity checks of the CUDA build: ok")
PY
[ $? -eq 0 ] || exit 1
echo "PASS: check_cuda_build: CUDA kernels of all 7 ops compiled and registered; CPU kernels agree with the reference"
