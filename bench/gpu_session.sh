#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (the `device` tool's `run`), run from the repo root:
#   bash bench/gpu_session.sh        (timeout_s 540 leaves time to rerun it once)
# It uses the machine's own python3 (torch with CUDA, safetensors, typer, rich, transformers,
# pytest are there; nothing can be installed), builds the native kernel, and writes every number
# to $OUT: the CUDA tests, the fold rates on cuda vs cpu (bench/gpu.py: bit-identical outputs
# checked), and 1 vs 2 ranks under torchrun on cuda:LOCAL_RANK (bench/ranks.py, issue 15).
set -uo pipefail
OUT=${OUT:-/tmp/merger-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
  python3 setup.py build_ext --inplace -q
  echo "== tests/test_gpu.py"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  echo "== bench/gpu.py"; timeout 180 python3 bench/gpu.py --shape 410m --revisions 9 --max-memory 8GB
  echo "== bench/ranks.py --device cuda"; timeout 150 python3 bench/ranks.py --shape 410m --revisions 5 --ranks 1,2 --device cuda
} 2>&1 | tee "$OUT/gpu_session.log"
cp -f bench/out/*.json "$OUT/" 2>/dev/null || true
