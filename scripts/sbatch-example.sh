#!/usr/bin/env bash
# An example Slurm job: 2 nodes x 8 GPUs, one task per GPU, expert parallel across 8 ranks.
# moetrain reads SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; the master is the job's first node.
#SBATCH --job-name=moetrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300          # SIGTERM 5 minutes before the limit: every rank saves and exits 0
set -euo pipefail
export MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 build/moetrain train --config "${CONFIG:-configs/tiny.yaml}" \
  --set run.device=cuda --set run.dtype=bf16 --set parallel.expert_parallel=8 --resume auto
