#!/usr/bin/env bash
# schemathesis (PyPI) against a real server: every check, the live OpenAPI document, an API key.
#   tests/schemathesis/run.sh [MAX_EXAMPLES]      (default 10; the issue's proof used more)
# Needs Python 3.12 or newer (schemathesis fails on 3.11.7: a CPython AST bug); prints a skip line
# when there is none. Builds the debug server if needed. Exits non-zero on any failure. The server
# runs with --max-model-len 1024, so even a request that leaves `max_tokens` to the server ends in
# seconds in a debug build; responses may take up to 60 s on 2 cores, since speed is not what this
# run checks (the benches measure it).
set -euo pipefail
cd "$(dirname "$0")/../.."
examples="${1:-10}"
python=""
for candidate in python3.13 python3.12 "$HOME/.pyenv/versions/3.13.0/bin/python" "$HOME/.pyenv/versions/3.12.1/bin/python"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "schemathesis: skipped: no Python 3.12 or newer here"
    exit 0
fi
venv="${SCHEMATHESIS_VENV:-$(mktemp -d)/venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==4.32.5"
fi
cargo build --locked --quiet --bin llava-server
port=$((20000 + RANDOM % 20000))
key="schemathesis-key"
log="$(mktemp)"
target/debug/llava-server serve --model tests/fixtures/tiny --port "$port" --api-key "$key" \
    --served-model-name tiny-llava --max-model-len 1024 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
done
SCHEMATHESIS_HOOKS=hooks PYTHONPATH=tests/schemathesis "$venv/bin/schemathesis" run \
    "http://127.0.0.1:$port/openapi.json" \
    --checks all \
    --header "Authorization: Bearer $key" \
    --max-examples "$examples" \
    --phases examples,coverage,fuzzing \
    --request-timeout 120 \
    --max-response-time 60 \
    --workers 1 \
    --seed 1 \
    --suppress-health-check too_slow,filter_too_much \
    --no-color
