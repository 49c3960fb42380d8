#!/usr/bin/env bash
# GPU check of the detectron2 bridge (docs/DETECTRON2.md): installs detectron2 from the pinned source (its _C for
# this machine's torch and CUDA; minutes) unless importable, and its runtime needs unless importable (pip honours
# PIP_NO_INDEX / PIP_FIND_LINKS for a machine without an index), puts Mask2Former (+ the stand-in for its compiled
# op: Mask2Former's PyTorch fallback runs) on PYTHONPATH, then runs tools/d2_gpu_check.py with the given options.
#   THIRD_PARTY=/path/with/{detectron2-src-02b5c4e.tar.gz,Mask2Former,stubs} bash tools/d2_gpu_check.sh [--iters 5 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${THIRD_PARTY:-}" ]; then
  echo "set THIRD_PARTY to the folder that holds detectron2-src-02b5c4e.tar.gz, Mask2Former/ and stubs/" >&2; exit 1
fi
THIRD_PARTY="$(cd "$THIRD_PARTY" && pwd)"
if ! python -c "import cloudpickle, omegaconf, hydra, matplotlib, black" 2>/dev/null; then
  python -m pip install cloudpickle "omegaconf>=2.1,<2.4" "hydra-core>=1.1" matplotlib black || {
    echo "detectron2 needs cloudpickle, omegaconf, hydra-core, matplotlib and black; install them first" >&2; exit 1; }
fi
if ! python -c "import detectron2._C" 2>/dev/null; then
  echo "Building detectron2 from $THIRD_PARTY/detectron2-src-02b5c4e.tar.gz"
  src="$(mktemp -d)"
  tar xzf "$THIRD_PARTY/detectron2-src-02b5c4e.tar.gz" -C "$src"
  python -m pip install --no-build-isolation --no-deps "$(dirname "$(find "$src" -maxdepth 2 -name setup.py | head -1)")"
fi
export PYTHONPATH="$THIRD_PARTY/Mask2Former:$THIRD_PARTY/stubs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python tools/d2_gpu_check.py "$@"
