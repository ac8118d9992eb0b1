#!/usr/bin/env bash
# The standard benchmark set: 70m x 9, 410m x 9, 5, 20 (about 20 GB of data under bench/out/data,
# 410m steps shared by symlinks; 30-40 min on 2 CPUs). Run bench/setup.sh once first (mergekit).
#   bash bench/all.sh [extra bench/run.py flags, e.g. --tools merger,cat]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
for spec in "70m 9 3" "410m 9 3" "410m 5 3" "410m 20 2"; do
  read -r shape n rep <<<"$spec"
  .venv/bin/python bench/run.py --shape "$shape" --revisions "$n" --repeat "$rep" "$@" \
    2>&1 | tee "bench/out/log-$shape-$n.txt"
done
