#!/usr/bin/env bash
# Fine-tune a pretrained ResNet on a (small) class-folder dataset with recipes/finetune.py: one GPU by
# default, since fine-tuning sets are small; more GPUs or nodes work the same way as the training
# templates (one srun task per node, accelerate launch, machine rank = $SLURM_NODEID on each node).
#
#   export DATA=/path/to/my_photos                # class folders, a shardify output or URL pattern
#   sbatch slurm/finetune.sh                      # from the repository root; resnet50, its default weights
#   MODEL=resnet18 PRETRAINED=/path/to/resnet18.pt sbatch slurm/finetune.sh
#   EXTRA_ARGS="--epochs 30 --trainable-layers 2" sbatch --gpus-per-node=2 slurm/finetune.sh
#
# PRETRAINED (optional): initial weights, a torchvision name (DEFAULT, IMAGENET1K_V1), a timm name
# (resnet50.a1_in1k) or a local file, passed as --weights; unset = the recipe's default. Offline
# clusters: point it at a local file. The fine-tuning options (--batch-size, --epochs, --lr,
# --trainable-layers, --auto, ...) and every training option go in EXTRA_ARGS; write training
# options as --flag=value (e.g. --img-size=160), the form every parser reads the same way.
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
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

RECIPE="${RECIPE:-finetune}"
MODEL="${MODEL:-resnet50}"
[[ -n "${PRETRAINED:-}" ]] && EXTRA_ARGS="--weights $PRETRAINED ${EXTRA_ARGS:-}"

# sbatch runs a copy of this file from its spool folder: find the repository from the submitted path.
for LAUNCHER_HOME in "${LAUNCHER_HOME:-}" \
    "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p')" \
    "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
    [[ -f "$LAUNCHER_HOME/slurm/common.sh" ]] && break
done
# shellcheck source=slurm/common.sh
source "$LAUNCHER_HOME/slurm/common.sh" || { echo "slurm/common.sh not found: set LAUNCHER_HOME=/path/to/resnet-launcher" >&2; exit 2; }
slurm_main
