#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL and Redis on 127.0.0.1, stopped when it ends.
#
#   scripts/test_services.sh .venv/bin/python -m pytest -q
#
# Exports BOT_TEST_POSTGRES_URL (postgresql+asyncpg://...) and BOT_TEST_REDIS_URL (redis://...)
# for the command; the tests that need a server skip when its variable is unset. A variable that
# is already set is kept (your own server) and nothing is started for it. A server whose program
# is not installed is left out with a note (`.ci/run` installs both). PostgreSQL runs as the
# `postgres` user when this script runs as root (initdb refuses root), in a temp dir, on a free
# port; Redis runs without persistence, also on a free port. Exit status: the command's.
set -euo pipefail

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bot-test-services.XXXXXX")"
chmod 755 "$WORK"
PG_STARTED=""
REDIS_PID=""

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

as_pg() {  # run a PostgreSQL program as the postgres user when we are root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop_services() {
    if [ -n "$PG_STARTED" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ -n "$REDIS_PID" ]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap stop_services EXIT
trap 'exit 130' INT TERM

start_postgres() {
    if [ -n "${BOT_TEST_POSTGRES_URL:-}" ]; then
        echo "test services: using BOT_TEST_POSTGRES_URL from the environment" >&2
        return
    fi
    if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
        echo "test services: PostgreSQL is not installed; its tests will be skipped" >&2
        return
    fi
    local port
    port="$(free_port)"
    mkdir -p "$WORK/pg"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK/pg"; fi
    as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --no-sync \
        >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w -t 60 \
        -o "-p $port -k $WORK/pg -c listen_addresses=127.0.0.1 -F" start >/dev/null \
        || { cat "$WORK/pg/server.log" >&2; exit 1; }
    PG_STARTED=1
    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres bot_test
    export BOT_TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:$port/bot_test"
    echo "test services: PostgreSQL on 127.0.0.1:$port" >&2
}

start_redis() {
    if [ -n "${BOT_TEST_REDIS_URL:-}" ]; then
        echo "test services: using BOT_TEST_REDIS_URL from the environment" >&2
        return
    fi
    if ! command -v redis-server >/dev/null; then
        echo "test services: redis-server is not installed; its tests will be skipped" >&2
        return
    fi
    local port i
    port="$(free_port)"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    for i in $(seq 100); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then break; fi
        if ! kill -0 "$REDIS_PID" 2>/dev/null; then cat "$WORK/redis.log" >&2; exit 1; fi
        sleep 0.1
    done
    export BOT_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
    echo "test services: Redis on 127.0.0.1:$port" >&2
}

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi
start_postgres
start_redis
set +e
"$@"
status=$?
set -e
exit "$status"
