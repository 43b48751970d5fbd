#!/usr/bin/env bash
# Starts N local processes of one command with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), prefixes each line of their output with the rank, and
# when any process fails stops the others and exits non-zero naming the failed rank. SIGTERM, SIGINT
# and SIGHUP are passed on to every rank (moetrain's ranks save and exit 0 on the first, exit at once
# on a second one a second or more later), and the launcher waits for every rank whatever arrives.
#
#   scripts/launch.sh --nproc 2 [--master-port P] [--grace S] -- build/moetrain train --config configs/tiny.yaml \
#       --set parallel.expert_parallel=2
#
# Several machines: run `torchrun --no-python` (or srun, see scripts/sbatch-example.sh) instead.
set -uo pipefail

usage() {
  echo "usage: scripts/launch.sh --nproc N [--master-port P] [--grace S] -- <command> [args...]" >&2
  exit 2
}
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "launch.sh: needs bash 5.1 or newer (wait -n -p), this is bash $BASH_VERSION" >&2
  exit 2
fi

nproc=""
port=""
grace=10  # seconds the other ranks get to exit after a failure before SIGKILL
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--master-port|--grace)
      [[ $# -ge 2 ]] || { echo "launch.sh: $1 expects a value" >&2; usage; }
      case "$1" in --nproc) nproc="$2" ;; --master-port) port="$2" ;; --grace) grace="$2" ;; esac
      shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --master-port=*) port="${1#*=}"; shift ;;
    --grace=*) grace="${1#*=}"; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --nproc expects a positive integer, got '$nproc'" >&2; exit 2; }
[[ "$grace" =~ ^[0-9]+$ ]] || { echo "launch.sh: --grace expects whole seconds, got '$grace'" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch.sh: no command after --" >&2; usage; }
if [[ -z "$port" ]]; then
  # A free port from the kernel; the store's server binds it a moment later.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]{1,5}$ ]] && (( 10#$port > 0 && 10#$port < 65536 )) \
  || { echo "launch.sh: --master-port expects a TCP port, got '$port'" >&2; exit 2; }

declare -A rank_of=()
pids=()
signals=0         # stop signals passed on so far
last_signal_us=0  # when the last one came ($EPOCHREALTIME in microseconds)
stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
forward() {  # a signal to the launcher goes to every rank; they finish the step, save and exit
  local now_us=${EPOCHREALTIME/[.,]/}
  # `timeout` and some schedulers signal the command and then its whole process group: the same
  # signal twice within microseconds. Passed on twice, it would stop the ranks without saving.
  if (( signals > 0 && now_us - last_signal_us < 1000000 )); then
    echo "launch.sh: received SIG$1 again within 1 s, taken as the same signal" >&2
    return
  fi
  signals=$((signals + 1))
  last_signal_us=$now_us
  if (( signals == 1 )); then
    echo "launch.sh: received SIG$1, passing it to every rank and waiting for them" >&2
  else
    echo "launch.sh: received SIG$1 again, passing it to every rank (a second signal stops moetrain without saving)" >&2
  fi
  stop_all "$1"
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# Each rank starts in its own process group (job control, on while starting them only: off, bash
# prints no job notices), so a signal meant for the launcher's group (Ctrl-C in a terminal, `timeout`,
# `kill -- -PGID`) reaches a rank once, through the launcher, not a second time directly: a second
# signal would stop the rank without saving.
set -m
for ((r = 0; r < nproc; r++)); do
  (( signals == 0 )) || break  # stopped while starting: start no more ranks
  RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r LOCAL_WORLD_SIZE=$nproc MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$@" < /dev/null > >(sed -u "s/^/[rank $r] /") 2> >(sed -u "s/^/[rank $r] /" >&2) &
  pid=$!
  rank_of[$pid]=$r
  pids+=("$pid")
done
set +m

status=0
killer=""
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  # A trapped signal interrupts wait: it returns > 128 and leaves `finished` unset; wait again.
  wait -n -p finished "${live[@]}"
  code=$?
  [[ -n "${finished:-}" ]] || continue
  rest=()
  for pid in "${live[@]}"; do [[ "$pid" != "$finished" ]] && rest+=("$pid"); done
  live=("${rest[@]}")
  if (( code != 0 && status == 0 )); then
    status=$code
    how="exited with status $code"
    (( code > 128 )) && how="was killed by signal $((code - 128))"
    echo "launch.sh: rank ${rank_of[$finished]} (pid $finished) $how; stopping the other ranks" >&2
    stop_all TERM
    set -m  # its own group, so that the sleep goes with it below
    ( exec >/dev/null 2>&1; sleep "$grace"; stop_all KILL ) &  # not holding our output open
    killer=$!
    set +m
  fi
done
[[ -n "$killer" ]] && kill -- "-$killer" 2>/dev/null  # its group: the sleep too
exit "$status"
