#!/usr/bin/env bash
# ResNet-50 with a "ResNet strikes back" recipe (RECIPE=a1 | a2 | a3, default a2), data-parallel on
# 1..N GPU nodes. A1: 600 epochs at 224 (80.4% top-1), A2: 300 epochs at 224 (79.8%), A3: 100 epochs
# at 160, evaluated at 224 (78.1%).
#
#   export DATA=/path/to/shards/imagenet          # shardify output (or URL pattern / class folders)
#   sbatch slurm/resnet50.sh                      # from the repository root; 1 node x 8 GPUs, A2
#   RECIPE=a3 sbatch --nodes=2 --partition=gpu slurm/resnet50.sh
#   RECIPE=a1 EXTRA_ARGS="--report-to wandb" sbatch --nodes=4 --time=2-00:00:00 slurm/resnet50.sh
#
# One srun task per node runs `accelerate launch` for that node's GPUs; machine rank = $SLURM_NODEID
# on each node, rendezvous at the first node, port 10000 + job id % 20000. The global batch is the
# recipe's whatever the node count (micro-batch x accumulation adapt), so results do not depend on it.
#
# Time limit / preemption: 120 s before the limit Slurm sends USR1 to this script
# (--signal=B:USR1@120; Slurm checks limits about every 30 s, so it can come that much earlier);
# the ranks finish their step, checkpoint and exit, and the job requeues itself (same job id, same run
# folder) and resumes where it stopped. Test it: `scancel --signal=USR1 --batch JOBID`. A job that
# completed, was cancelled or failed for a real error is not requeued (at most MAX_REQUEUES times).
#
# Environment knobs (all optional except DATA), documented in slurm/common.sh:
#   DATA OUTPUT RUNS_DIR EXTRA_ARGS MODEL RECIPE PROCS_PER_NODE (= GPUS_PER_NODE) DEVICE
#   ACCELERATE_CONFIG (e.g. recipes/accelerate/deepspeed_zero2.yaml) MASTER_ADDR MASTER_PORT
#   MAX_REQUEUES PYTHON LAUNCHER_HOME; opt-ins NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG.
# Every #SBATCH line below is overridable on the sbatch command line (or SBATCH_* variables).
# Output: %x-%j.out in the submit directory, appended to by requeued attempts.
#
#SBATCH --job-name=resnet50
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

RECIPE="${RECIPE:-a2}"
MODEL="${MODEL:-resnet50}"

# sbatch runs a copy of this file from its spool folder: find the repository from the submitted path.
for LAUNCHER_HOME in "${LAUNCHER_HOME:-}" \
    "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p')" \
    "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
    [[ -f "$LAUNCHER_HOME/slurm/common.sh" ]] && break
done
# shellcheck source=slurm/common.sh
source "$LAUNCHER_HOME/slurm/common.sh" || { echo "slurm/common.sh not found: set LAUNCHER_HOME=/path/to/resnet-launcher" >&2; exit 2; }
slurm_main
