#!/usr/bin/env bash
# Replicas of `trace-rt serve` behind nginx's gRPC proxy: the one-machine stand-in for a
# cluster (deploy/k8s is the real thing).
#
#   deploy/local/cluster.sh start REPO [--replicas N] [--port P] [--base-port B]
#                                      [--routing hash|round-robin] [--dir RUN]
#   deploy/local/cluster.sh status [--dir RUN]
#   deploy/local/cluster.sh stop [--dir RUN]
#
# REPO is a directory or a URL (s3://, https://: each replica fetches it, checked, into
# one cache, $TRACE_RT_CACHE). Clients talk gRPC to 127.0.0.1:P (default 8101). With
# --routing hash (the default) nginx sends every request carrying the same `x-video-id`
# header to the same replica (consistent hashing), so a video's follow-up questions find
# its cache; round-robin spreads requests.
# Replica i listens on B+10i (gRPC), B+10i+1 (HTTP), B+10i+2 (metrics); B defaults to 18000.
# Environment: TRACE_RT (the trace-rt command; default .venv/bin/trace-rt, else on PATH),
# NGINX_BIN (default nginx; nginx itself reads $NGINX), READY_TIMEOUT (seconds per replica,
# default 300).
set -euo pipefail

usage() { sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cmd=${1:-}; [ -n "$cmd" ] || usage; shift
repo=""
if [ "$cmd" = start ]; then repo=${1:-}; [ -n "$repo" ] || usage; shift; fi
replicas=3 port=8101 base=18000 routing=hash run="$root/.cluster" max_body=256m
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --base-port) base=$2; shift 2 ;;
    --routing) routing=$2; shift 2 ;;
    --dir) run=$2; shift 2 ;;
    --max-body) max_body=$2; shift 2 ;;
    *) echo "cluster.sh: unknown option $1" >&2; usage ;;
  esac
done
trace_rt=${TRACE_RT:-}
if [ -z "$trace_rt" ]; then
  if [ -x "$root/.venv/bin/trace-rt" ]; then trace_rt="$root/.venv/bin/trace-rt"; else trace_rt=trace-rt; fi
fi
nginx=${NGINX_BIN:-nginx}
unset NGINX  # nginx would take it for inherited listening sockets

# A killed process whose parent has gone stays a zombie until init reaps it (some
# container inits never do): kill -0 still succeeds on it, so its state is checked too.
alive() {
  [ -f "$1" ] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo "?")
  [ "$state" != Z ]
}

stop_all() {
  [ -d "$run" ] || { echo "cluster.sh: nothing running in $run"; return 0; }
  if alive "$run/nginx.pid"; then
    kill -QUIT "$(cat "$run/nginx.pid")" || true  # graceful: finish open requests
  fi
  local pids=()
  for f in "$run"/replica-*.pid; do
    [ -e "$f" ] || continue
    if alive "$f"; then kill -TERM "$(cat "$f")" && pids+=("$(cat "$f")"); fi
  done
  for _ in $(seq 1 120); do  # trace-rt serve stops tritonserver, which drains first
    local left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
  for _ in $(seq 1 20); do alive "$run/nginx.pid" || break; sleep 0.25; done
  rm -f "$run"/replica-*.pid "$run/nginx.pid"
  echo "stopped ($run)"
}

start_all() {
  # A URL (s3://, https://) is fetched by each replica's `trace-rt serve` into one cache.
  if ! [[ "$repo" =~ ^[a-z][a-z0-9+.-]*:// ]]; then
    [ -d "$repo" ] || die "model repository $repo not found (python -m triton_repo build ...)"
  fi
  command -v "$nginx" >/dev/null || die "nginx not found (apt-get install -y nginx-light)"
  case "$routing" in
    hash) balance='hash $http_x_video_id consistent;' ;;
    round-robin) balance='' ;;
    *) die "--routing must be hash or round-robin, not $routing" ;;
  esac
  [[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "--replicas must be a positive number"
  if alive "$run/nginx.pid"; then die "already running in $run (cluster.sh stop --dir $run)"; fi
  mkdir -p "$run/tmp"
  rm -f "$run"/*.log
  for d in body proxy fastcgi uwsgi scgi; do mkdir -p "$run/tmp/$d"; done
  chmod -R 1777 "$run/tmp"  # nginx's workers drop root privileges when started as root
  trap 'echo "cluster.sh: start failed; stopping what started" >&2; stop_all >&2' ERR
  servers=""
  for i in $(seq 0 $((replicas - 1))); do
    g=$((base + 10 * i))
    # setsid: a replica is its own process group, so a signal to the script's group
    # (Ctrl-C in a terminal) does not reach it; `stop` ends it.
    setsid "$trace_rt" serve --repo "$repo" --grpc-port "$g" --http-port $((g + 1)) \
      --metrics-port $((g + 2)) --log-file "$run/replica-$i.triton.log" \
      --timeout "${READY_TIMEOUT:-300}" >"$run/replica-$i.log" 2>&1 </dev/null &
    echo $! >"$run/replica-$i.pid"
    servers+="        server 127.0.0.1:$g max_fails=1 fail_timeout=10s;"$'\n'
  done
  for i in $(seq 0 $((replicas - 1))); do
    until grep -q '^ready: ' "$run/replica-$i.log" 2>/dev/null; do
      if ! alive "$run/replica-$i.pid"; then
        tail -n 20 "$run/replica-$i.log" >&2
        false  # the ERR trap stops the others
      fi
      sleep 0.5
    done
    echo "replica $i ready: gRPC 127.0.0.1:$((base + 10 * i)) (pid $(cat "$run/replica-$i.pid"))"
  done
  python3 - "$here/nginx.conf.in" "$run/nginx.conf" <<PY
import sys
text = open(sys.argv[1]).read()
for k, v in {"@RUN@": "$run", "@LISTEN@": "127.0.0.1:$port", "@BALANCE@": """$balance""",
             "@SERVERS@": """${servers%$'\n'}""", "@MAX_BODY@": "$max_body"}.items():
    text = text.replace(k, v)
open(sys.argv[2], "w").write(text)
PY
  "$nginx" -t -q -p "$run" -e "$run/nginx-error.log" -c "$run/nginx.conf"
  # The daemon must not hold the caller's stdout/stderr (a caller reading them to the end
  # would wait for nginx to exit).
  "$nginx" -p "$run" -e "$run/nginx-error.log" -c "$run/nginx.conf" </dev/null >/dev/null 2>&1
  trap - ERR
  echo "ready: gRPC 127.0.0.1:$port -> $replicas replicas ($routing routing); logs in $run"
}

status() {
  local rc=0
  if alive "$run/nginx.pid"; then echo "nginx: running (pid $(cat "$run/nginx.pid"))"; else echo "nginx: stopped"; rc=1; fi
  for f in "$run"/replica-*.pid; do
    [ -e "$f" ] || continue
    local n; n=$(basename "$f" .pid)
    if alive "$f"; then echo "$n: running (pid $(cat "$f"))"; else echo "$n: stopped"; rc=1; fi
  done
  return $rc
}

case "$cmd" in
  start) start_all ;;
  stop) stop_all ;;
  status) status ;;
  *) usage ;;
esac
