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
command -v setsid >/dev/null || { echo "launch.sh: needs setsid (util-linux)" >&2; exit 2; }

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
last_signal=""    # the last one's name, and when it came ($EPOCHREALTIME in microseconds)
last_signal_us=0
stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
forward() {  # a signal to the launcher goes to every rank; they finish the step, save and exit
  local now_us=${EPOCHREALTIME/[.,]/}
  # `timeout` and some schedulers signal the command and then its whole process group: the same
  # signal twice within microseconds. Passed on twice, it would stop the ranks without saving.
  if [[ "$1" == "$last_signal" ]] && (( now_us - last_signal_us < 1000000 )); then
    echo "launch.sh: received SIG$1 again within 1 s, taken as the same signal" >&2
    return
  fi
  signals=$((signals + 1))
  last_signal=$1
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

# Each rank runs in its own session (setsid: this shell's children lead no group, so it execs in
# place and $! stays the rank's pid), so a signal meant for the launcher's group (Ctrl-C in a terminal,
# `timeout`, `kill -- -PGID`) reaches a rank once, through the launcher, not a second time directly:
# a second signal would stop the rank without saving. The output filters stay in the launcher's
# group and ignore those signals, to pass on what the ranks print while they save.
for ((r = 0; r < nproc; r++)); do
  (( signals == 0 )) || break  # stopped while starting: start no more ranks
  RANK=$r WORLD_SIZE=$nproc LOCAL_RANK=$r LOCAL_WORLD_SIZE=$nproc MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    setsid "$@" < /dev/null > >(trap '' INT TERM; exec sed -u "s/^/[rank $r] /") \
    2> >(trap '' INT TERM; exec sed -u "s/^/[rank $r] /" >&2) &
  pid=$!
  rank_of[$pid]=$r
  pids+=("$pid")
done

status=0
if (( ${#pids[@]} < nproc )); then
  echo "launch.sh: stopped by SIG$last_signal while starting the ranks (${#pids[@]} of $nproc started)" >&2
  status=1
fi
killer=""
live=("${pids[@]}")
ended() {  # $1: a rank's pid, $2: its exit status
  local pid rest=()
  for pid in "${live[@]}"; do [[ "$pid" != "$1" ]] && rest+=("$pid"); done
  live=("${rest[@]}")
  if (( $2 != 0 && status == 0 )); then
    status=$2
    local how="exited with status $2"
    (( $2 > 128 )) && how="was killed by signal $(($2 - 128))"
    echo "launch.sh: rank ${rank_of[$1]} (pid $1) $how; stopping the other ranks" >&2
    stop_all TERM
    ( exec >/dev/null 2>&1; sleep "$grace"; stop_all KILL ) &  # not holding our output open
    killer=$!
  fi
}
while (( ${#live[@]} > 0 )); do
  wait -n -p finished "${live[@]}" 2>/dev/null  # (it names the pids of the reaped ranks below)
  code=$?
  if [[ -n "${finished:-}" ]]; then
    ended "$finished" "$code"
  elif (( code == 127 )); then
    # "No such job": bash had already reaped them (it drops ended jobs it has reported, keeping
    # their status for `wait PID`), so find those that are gone.
    n=${#live[@]}
    for pid in "${live[@]}"; do
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid"
      ended "$pid" $?
    done
    (( ${#live[@]} < n )) || sleep 0.1
  fi  # else a trapped signal interrupted wait (> 128, `finished` unset): wait again
done
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null
exit "$status"
