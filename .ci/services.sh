#!/usr/bin/env bash
# A throwaway PostgreSQL and an `mlflow server` on it, loopback only, for the multi-worker tests.
#
#   eval "$(.ci/services.sh start)"    # starts both; prints the `export` lines below
#   make test                          # tests/integration/test_pg_workers.py uses them
#   .ci/services.sh stop               # stops both and deletes their folder
#
# Exports: PREFSCULPT_TEST_PG_URL      postgresql+psycopg://postgres@127.0.0.1:PORT/optuna (Optuna storage)
#          PREFSCULPT_TEST_MLFLOW_URL  http://127.0.0.1:PORT (tracking + registry on database `mlflow`)
#          PREFSCULPT_SERVICES_DIR     the folder holding the cluster, the artifacts, logs and pids
# MLflow and Optuna get separate databases: both keep their schema version in Alembic's `alembic_version`.
# Needs root (Debian's `postgresql` package is installed when missing; initdb/pg_ctl run as `postgres`).
# MLFLOW (default: .venv/bin/mlflow, else mlflow on PATH) is the mlflow that serves; it needs psycopg 3.
set -euo pipefail

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

start() {
  if [[ -z "$(pg_bin)" ]]; then
    echo "services: installing postgresql" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  fi
  local bin pg_port ml_port mlflow_bin
  bin=$(pg_bin)
  dir=$(mktemp -d /tmp/prefsculpt-services.XXXXXX)
  # Whatever fails from here on, nothing stays behind (ok is set once both answer).
  trap '[[ -n "${ok:-}" ]] || stop "$dir"' EXIT
  chmod 755 "$dir"
  mkdir -p "$dir/pg" "$dir/artifacts"
  chown postgres:postgres "$dir/pg"
  pg_port=$(free_port)
  # Own cluster, trust auth on loopback: nothing outside this machine can reach it.
  runuser -u postgres -- "$bin/initdb" -D "$dir/pg" -U postgres -A trust >"$dir/initdb.log" 2>&1
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/pg" -l "$dir/pg/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$dir/pg" start >&2
  echo "$pg_port" >"$dir/pg_port"
  for db in mlflow optuna; do
    runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres "$db"
  done

  mlflow_bin=${MLFLOW:-}
  if [[ -z "$mlflow_bin" ]]; then
    if [[ -x .venv/bin/mlflow ]]; then mlflow_bin=.venv/bin/mlflow; else mlflow_bin=$(command -v mlflow); fi
  fi
  ml_port=$(free_port)
  # setsid: its own process group, so `stop` ends the server and every process it forked. One worker
  # process and no job executor (huey consumers): on a loaded 2-core machine uvicorn kills
  # children that start slowly, and the tests use neither.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow_bin" server --backend-store-uri "postgresql+psycopg://postgres@127.0.0.1:$pg_port/mlflow" \
    --artifacts-destination "$dir/artifacts" --serve-artifacts --host 127.0.0.1 --port "$ml_port" --workers 1 \
    >"$dir/mlflow.log" 2>&1 </dev/null &
  echo $! >"$dir/mlflow.pid"
  local url="http://127.0.0.1:$ml_port"
  for _ in $(seq 1 240); do
    if python3 -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; then break; fi
    if ! kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then
      echo "services: mlflow server exited; its log ($dir/mlflow.log):" >&2
      tail -30 "$dir/mlflow.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  if ! python3 -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; then
    echo "services: mlflow server did not answer on $url within 120 s; its log:" >&2
    tail -30 "$dir/mlflow.log" >&2
    exit 1
  fi
  ok=1
  echo "services: PostgreSQL on 127.0.0.1:$pg_port, mlflow server on $url (folder $dir)" >&2
  echo "export PREFSCULPT_SERVICES_DIR=$dir"
  echo "export PREFSCULPT_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/optuna"
  echo "export PREFSCULPT_TEST_MLFLOW_URL=$url"
}

stop() {
  local dir=${1:-${PREFSCULPT_SERVICES_DIR:-}}
  if [[ -z "$dir" || ! -d "$dir" ]]; then
    echo "services: nothing to stop (give the folder or set PREFSCULPT_SERVICES_DIR)" >&2
    return 0
  fi
  if [[ -f "$dir/mlflow.pid" ]]; then
    local pgid
    pgid=$(cat "$dir/mlflow.pid")
    kill -- -"$pgid" 2>/dev/null || true
    for _ in $(seq 1 20); do  # uvicorn shuts down gracefully; give it 10 s, then kill what is left
      kill -0 -- -"$pgid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- -"$pgid" 2>/dev/null || true
  fi
  if [[ -f "$dir/pg/PG_VERSION" ]]; then
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$dir/pg" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  echo "services: stopped ($dir)" >&2
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: $0 start | stop [DIR]" >&2; exit 2 ;;
esac
