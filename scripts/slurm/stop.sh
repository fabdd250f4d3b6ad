#!/usr/bin/env bash
# Stop the cluster that scripts/slurm/start.sh started in DIR: cancel its jobs, then stop each daemon by
# the pid in its pid file (never by process name: other clusters or the system's own daemons may run).
#
#   scripts/slurm/stop.sh [DIR] [--purge]     # --purge also deletes DIR
set -uo pipefail

PURGE=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = --purge ]; then PURGE=1; else ARGS+=("$arg"); fi
done
DIR=$(realpath -m "${ARGS[0]:-${INSTRUCTBLIP_SLURM_DIR:-/tmp/instructblip-slurm}}")
export SLURM_CONF="$DIR/etc/slurm.conf"

running() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$state" ] && [ "${state:0:1}" != Z ]; }

# Jobs first, so that no slurmstepd or job process outlives the daemons.
if [ -f "$SLURM_CONF" ] && [ -f "$DIR/run/slurmctld.pid" ] && running "$(cat "$DIR/run/slurmctld.pid")"; then
  jobs=$(timeout 10 squeue --noheader --format=%A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(timeout 5 squeue --noheader --format=%A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

stop_daemon() {  # NAME: stop the process in DIR/run/NAME.pid if it is one of this cluster's
  local pidfile="$DIR/run/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # A pid file can outlive its process and the pid be reused: only signal a process that names DIR.
  if [ -n "$pid" ] && running "$pid" && cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null \
       | tr '\0' '\n' | grep -aF "$DIR/" >/dev/null; then   # not grep -q: an early exit fails the pipe
    kill -TERM "$pid"
    for _ in $(seq 150); do running "$pid" || break; sleep 0.2; done
    if running "$pid"; then
      echo "slurm stop: $1 (pid $pid) still running 30 s after SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid"
    fi
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}

# Clients before servers: slurmd, slurmctld, then accounting, then authentication.
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  stop_daemon "$daemon"
done

if [ "$PURGE" = 1 ]; then
  rm -rf "$DIR"
  echo "removed $DIR"
fi
