#!/usr/bin/env bash
# Starts N local processes of one command with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), prefixes each line of their output with the rank, and
# when any process fails stops the others and exits non-zero naming the failed rank. SIGTERM/SIGINT
# are passed on to every rank (they save and exit 0).
#
#   scripts/launch.sh --nproc 2 [--master-port 29500] -- build/moetrain train --config configs/tiny.yaml \
#       --set parallel.expert_parallel=2
#
# Several machines: run `torchrun --no-python` (or srun, see scripts/sbatch-example.sh) instead.
set -uo pipefail

usage() {
  echo "usage: scripts/launch.sh --nproc N [--master-port P] [--grace S] -- <command> [args...]" >&2
  exit 2
}

nproc=""
port=""
grace=10  # seconds the other ranks get to exit after a failure before SIGKILL
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="${2:-}"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --master-port) port="${2:-}"; shift 2 ;;
    --master-port=*) port="${1#*=}"; shift ;;
    --grace) grace="${2:-}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --nproc expects a positive integer, got '$nproc'" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch.sh: no command after --" >&2; usage; }
if [[ -z "$port" ]]; then
  # A free port from the kernel; the store's server binds it a moment later.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || { echo "launch.sh: --master-port expects a TCP port, got '$port'" >&2; exit 2; }

declare -A rank_of=()
pids=()
for ((r = 0; r < nproc; r++)); do
  RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r LOCAL_WORLD_SIZE=$nproc MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$@" > >(sed -u "s/^/[rank $r] /") 2> >(sed -u "s/^/[rank $r] /" >&2) &
  pid=$!
  rank_of[$pid]=$r
  pids+=("$pid")
done

stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
forward() {  # a signal to the launcher goes to every rank; they finish the step, save and exit
  echo "launch.sh: received SIG$1, passing it to every rank" >&2
  stop_all "$1"
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  finished=""
  wait -n -p finished "${live[@]}"
  code=$?
  [[ -z "$finished" ]] && continue  # interrupted by a trapped signal; keep waiting
  rest=()
  for pid in "${live[@]}"; do [[ "$pid" != "$finished" ]] && rest+=("$pid"); done
  live=("${rest[@]}")
  if (( code != 0 && status == 0 )); then
    status=$code
    how="exited with status $code"
    (( code > 128 )) && how="was killed by signal $((code - 128))"
    echo "launch.sh: rank ${rank_of[$finished]} (pid $finished) $how; stopping the other ranks" >&2
    stop_all TERM
    ( exec >/dev/null 2>&1; sleep "$grace"; stop_all KILL ) &  # not holding our output open
    killer=$!
  fi
done
[[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
wait 2>/dev/null  # the output filters
exit "$status"
