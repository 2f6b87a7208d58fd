#!/usr/bin/env bash
# The GPU checks of scripts/gpu_check.py, one line each, within 8 minutes: device choice and bf16 leaf
# training, faiss-gpu against faiss-cpu, vLLM against the transformers evaluator, Ray with one GPU actor.
# Without CUDA the CPU variants run (marked [cpu]) and the GPU-only check prints "SKIP vllm: no CUDA".
#
#   scripts/gpu_check.sh [--install] [--require-gpu] [--only device,train,faiss,ray,vllm] [--workdir DIR]
#
# Python: $PYTHON, else .venv/bin/python, else python3: use one with CUDA torch, faiss-gpu and vLLM where
# the machine has them. --install first installs the project with its `gpu` and `ray` extras into that
# Python (needs a package index). The repository root goes on PYTHONPATH, so an uninstalled checkout works
# wherever its dependencies are present. GPU_CHECK_TIMEOUT_S (default 480) bounds the whole run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

install=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--install" ]]; then install=1; else args+=("$arg"); fi
done
if (( install )); then
  "$py" -m pip install --quiet -e '.[gpu,ray]'
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
limit="${GPU_CHECK_TIMEOUT_S:-480}"

set +e
timeout --kill-after=20 "$limit" "$py" scripts/gpu_check.py "${args[@]}"
rc=$?
set -e
if (( rc == 124 || rc == 137 )); then
  echo "FAIL gpu_check: stopped at the ${limit} s limit; the checks not printed above did not finish"
fi
exit "$rc"
