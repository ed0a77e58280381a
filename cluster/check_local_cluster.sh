#!/usr/bin/env bash
# `ray up` for real, on this machine: a loopback sshd, `ray up` of cluster/local.yaml (a head at
# 127.0.0.1, reached over SSH), the tiny pad ablation run on it with `ray exec ... --address auto`,
# a check that its trials and MLflow runs landed, `ray down`, and a check that no process of the
# cluster is left. Prints the timings. Runs as root (sshd, apt-get); about a minute on 2 CPUs.
#
#   cluster/check_local_cluster.sh
#
# Environment: VPNS_PYTHON (default: the repo's .venv/bin/python), VPNS_LOCAL_CLUSTER_DIR (default
# /tmp/vpns-local-cluster: keys, sshd, the head's HOME, Ray's temp dir, the sweep's results),
# VPNS_LOCAL_CLUSTER_PORT_BASE (default 26300: Ray's ports are base..base+59, sshd's base+10).
# Everything of the cluster lives in that folder and those ports; it never runs a bare `ray stop`
# (which would stop every Ray on the machine) and is stopped on any exit (trap).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${VPNS_PYTHON:-$REPO/.venv/bin/python}
RAY=$(dirname "$PY")/ray
DIR=${VPNS_LOCAL_CLUSTER_DIR:-/tmp/vpns-local-cluster}
DIR=${DIR%/}
BASE=${VPNS_LOCAL_CLUSTER_PORT_BASE:-26300}
SSH_PORT=$((BASE + 10))
HELPER="$PY $REPO/cluster/local_cluster.py"
YAML=$DIR/local.yaml
# The launcher's own state (node provider state, config cache) goes to DIR/launcher, not /tmp/ray.
LAUNCH=(env TMPDIR="$DIR/launcher" nice -n 10 "$RAY")

t_up=- t_sweep=- t_down=-
cluster_started=0 child=
# A long step runs in the background and is waited for: bash runs a signal's trap only between
# commands, and `wait` is one it can interrupt, so Ctrl-C / SIGTERM reach cleanup at once.
# The log is redirected inside: a trap runs with the redirections of the command it interrupts.
step() { local log=$1; shift; "$@" > "$log" 2>&1 & child=$!; wait "$child"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ -x "$PY" ] || { echo "error: no python at $PY (set VPNS_PYTHON)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: run as root (a loopback sshd logs in as root)" >&2; exit 2; }
# Ray's sockets live in DIR/ray/session_<40 chars>/sockets/...: a Unix socket path has 107 bytes.
[ ${#DIR} -le 40 ] || { echo "error: $DIR: at most 40 characters (Ray's socket paths)" >&2; exit 2; }
if [ -e "$DIR" ]; then
  if [ -n "$(ls -A "$DIR")" ] && [ ! -e "$DIR/local.yaml" ]; then
    echo "error: $DIR exists and is not a local cluster's folder; not removing it" >&2; exit 2
  elif $HELPER leftovers "$DIR" >/dev/null; then
    rm -rf "$DIR"  # the last run's
  else
    echo "error: a cluster of $DIR is running:" >&2; $HELPER leftovers "$DIR" >&2 || true; exit 2
  fi
fi
busy=$({ $HELPER ports "$BASE"; echo "$SSH_PORT"; } | "$PY" -c '
import socket, sys
for port in map(int, sys.stdin):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            print(port, end=" ")')
[ -z "$busy" ] || { echo "error: ports in use: $busy(set VPNS_LOCAL_CLUSTER_PORT_BASE)" >&2; exit 2; }

missing=()
command -v /usr/sbin/sshd >/dev/null || missing+=(openssh-server)
command -v rsync >/dev/null || missing+=(rsync)
command -v nc >/dev/null || missing+=(netcat-openbsd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cleanup() {
  rc=$?
  trap - EXIT
  trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
  set +e  # clean up as much as possible, whatever fails
  [ -n "$child" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null
  if [ "$cluster_started" = 1 ]; then
    t0=$(now)
    # `ray down` runs `ray stop` on the head: there, `ray` is local_cluster.py's shim, which
    # stops this cluster's Ray only.
    "${LAUNCH[@]}" down -y "$YAML" > "$DIR/down.log" 2>&1 || { echo "ray down failed (rc $?):"; tail -5 "$DIR/down.log"; rc=1; }
    t_down=$(since "$t0")
  fi
  $HELPER stop-all "$DIR" >/dev/null  # what ray down left (none, normally), ssh clients, sshd
  wait 2>/dev/null || true
  if left=$($HELPER leftovers "$DIR"); then
    echo "after down: $left"
  else
    echo "after down, still running:"; echo "$left"; rc=1
  fi
  echo "timing: cluster up ${t_up} s, sweep ${t_sweep} s, down ${t_down} s"
  echo "check_local_cluster: $([ "$rc" = 0 ] && echo OK || echo "FAILED (rc $rc)")"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

mkdir -p "$DIR/ssh" "$DIR/launcher"
chmod 700 "$DIR"
$HELPER render "$DIR" "$SSH_PORT" "$BASE"
ssh-keygen -q -t ed25519 -N '' -C vpns-local-host -f "$DIR/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -C vpns-local-user -f "$DIR/ssh/user_key"
cp "$DIR/ssh/user_key.pub" "$DIR/ssh/authorized_keys"
mkdir -p /run/sshd  # sshd's privilege separation folder
# nice: the cluster's Ray inherits it through the SSH sessions.
# -D: the script's own child, reaped by the `wait` in cleanup.
nice -n 10 /usr/sbin/sshd -D -f "$DIR/ssh/sshd_config" -p "$SSH_PORT" -o ListenAddress=127.0.0.1 \
  -E "$DIR/ssh/sshd.log" &
for _ in $(seq 50); do [ -s "$DIR/ssh/sshd.pid" ] && break; sleep 0.1; done
echo "sshd: pid $(cat "$DIR/ssh/sshd.pid") on 127.0.0.1:$SSH_PORT (config $DIR/ssh/sshd_config)"

echo "ray up: $YAML (log $DIR/up.log)"
t0=$(now)
cluster_started=1
step "$DIR/up.log" "${LAUNCH[@]}" up -y --no-config-cache --disable-usage-stats "$YAML" \
  || { echo "ray up failed:"; tail -20 "$DIR/up.log"; exit 1; }
t_up=$(since "$t0")
echo "cluster up: ${t_up} s"

# On the head, RAY_ADDRESS (its .bashrc) is this cluster's GCS: `--address auto` finds it.
sweep="cd $REPO && $PY sweeps/ablation_pad.py --preset tiny --seeds 7 --address auto \
--storage-path $DIR/sweeps --tracking-uri sqlite:///$DIR/mlflow.db"
echo "ray exec: $sweep (log $DIR/sweep.log)"
t0=$(now)
step "$DIR/sweep.log" "${LAUNCH[@]}" exec --no-config-cache "$YAML" "$sweep" \
  || { echo "sweep failed:"; tail -20 "$DIR/sweep.log"; exit 1; }
t_sweep=$(since "$t0")
echo "sweep: ${t_sweep} s; $(grep -E '^\[ablation_pad-tiny-[^]]*\] [0-9]+ trials' "$DIR/sweep.log" | cut -c1-160)"
$HELPER results "$DIR/sweeps" "sqlite:///$DIR/mlflow.db"
