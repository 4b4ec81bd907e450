#!/usr/bin/env bash
# Issue 4's comparison in one sitting: the peers from ../shared/anchors and `python -m bot bench`
# on the same checkpoint, one after the other, one JSON object per line on stdout.
#
# Usage: scripts/bench_side_by_side.sh HF_DIR GGUF REGISTRY [MODEL_PREFIX]
#   HF_DIR        the checkpoint folder (`python -m models fetch-default HF_DIR`)
#   GGUF          the GGUF file llama.cpp runs (the default model's own Q4_1 file)
#   REGISTRY      a registry holding PREFIX-fp32, PREFIX-int8 and PREFIX-int4 exported from HF_DIR
#                 (`python -m export HF_DIR --name s-fp32 --precision fp32 --registry REGISTRY`)
# Peers run from their own virtual environments (their pins collide with ours; see
# ../shared/anchors/README.md); each is skipped when its variable is unset:
#   HF_PY, OPTIMUM_PY, GENAI_PY, LLAMA_PY    python executables
#   GENAI_FP32, GENAI_INT4                   onnxruntime-genai builder outputs for HF_DIR
# SPIN=1 also runs our engine with `--spin` (the peers' threads spin by default).
# PRECISIONS="int4" (default "fp32 int8 int4") limits our runs to those precisions (a quick
# 4-bit sitting: the 4-bit peers and our int4 alone).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
hf_dir=$1 gguf=$2 registry=$3 prefix=${4:-s}
here=$(cd "$(dirname "$0")/.." && pwd)
anchors=${ANCHORS:-$here/../shared/anchors}
py=${PYTHON:-$here/.venv/bin/python}

peer() {  # peer PYTHON ARGS...: one JSON line from an anchor script, or a note when it fails
    "$@" 2>/dev/null | tail -1 || echo "{\"engine\": \"$3\", \"error\": \"failed\"}"
}
ours() {  # ours MODEL PROMPT CONCURRENCY [--spin]
    "$py" -m bot bench --registry "$registry" --model "$prefix-$1" --prompt-tokens "$2" \
        --new-tokens 128 --concurrency "$3" "${@:4}" --json 2>/dev/null | tail -1
}

echo "{\"sitting\": \"$(date -u +%FT%TZ)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
[ -n "${HF_PY:-}" ] && peer "$HF_PY" "$anchors/bench_anchors.py" hf "$hf_dir"
[ -n "${OPTIMUM_PY:-}" ] && peer "$OPTIMUM_PY" "$anchors/bench_anchors.py" optimum "$hf_dir"
[ -n "${GENAI_PY:-}" ] && [ -n "${GENAI_FP32:-}" ] &&
    peer "$GENAI_PY" "$anchors/bench_anchors.py" "genai:$GENAI_FP32" x
[ -n "${GENAI_PY:-}" ] && [ -n "${GENAI_INT4:-}" ] &&
    peer "$GENAI_PY" "$anchors/bench_anchors.py" "genai:$GENAI_INT4" x
[ -n "${LLAMA_PY:-}" ] && peer "$LLAMA_PY" "$anchors/bench_llamacpp.py" "$gguf"
precisions=${PRECISIONS:-fp32 int8 int4}
for precision in $precisions; do ours "$precision" 128 1; done
for precision in ${precisions/int8/}; do ours "$precision" 128 8; ours "$precision" 1024 1; done
if [ "${SPIN:-0}" = 1 ]; then
    for precision in $precisions; do ours "$precision" 128 1 --spin; done
    for precision in ${precisions/int8/}; do
        ours "$precision" 128 8 --spin
        ours "$precision" 1024 1 --spin
    done
fi
echo "{\"end\": \"$(date -u +%FT%TZ)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
