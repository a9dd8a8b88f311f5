# shellcheck shell=bash
# The shared part of the sbatch templates in this folder (resnet101.sh, resnet50.sh, resnet18.sh,
# finetune.sh). A template sets its defaults (RECIPE, MODEL, ...), sources this file and calls
# `slurm_main`. Nothing here runs on source, so the node side can source it too.
#
# What one job does:
#   1. resolves the settings below from the environment and Slurm's variables, and prints them
#      (DATA, OUTPUT, RUNS_DIR, RECIPE and ACCELERATE_CONFIG paths are made absolute against the submit
#      directory: the training runs in the repository root, where the accelerate/DeepSpeed configs'
#      own relative paths point; relative paths inside EXTRA_ARGS are relative to the repository root);
#   2. starts ONE srun task per node (--ntasks-per-node=1, --kill-on-bad-exit=1); each task runs
#      `accelerate launch` with --machine_rank=$SLURM_NODEID expanded ON THAT NODE (inside the srun
#      command), --num_machines=$SLURM_NNODES, --num_processes=nodes x processes per node, and the
#      rendezvous at the first node of the allocation;
#   3. forwards USR1/TERM (sent to this batch shell by `#SBATCH --signal=B:USR1@120` before the time
#      limit, by `scancel --signal=USR1 --batch`, or by preemption) to the training ranks, which finish
#      their optimizer step, checkpoint, write <output>/PREEMPTED and exit 75;
#   4. decides: <output>/summary.json -> done (exit 0); PREEMPTED -> `scontrol requeue` (same job id,
#      so the same run folder; the requeued job continues with --resume auto) unless MAX_REQUEUES is
#      reached or the job was cancelled; anything else -> the job fails with the training's exit code
#      and is NOT requeued.
#
# Settings (environment variables; export them or pass `sbatch --export=ALL,NAME=value`):
#   DATA            dataset: shardify output folder, URL/brace pattern or class-folder tree (required)
#   RECIPE          a1 | a2 | a3 | finetune | path/to/recipe.py          (template default)
#   MODEL           resnet18 | resnet34 | resnet50 | resnet101 | resnet152  (template default)
#   OUTPUT          run folder (default: $RUNS_DIR/<job name>-<job id>; a requeued job keeps its id,
#                   so it finds its own checkpoints; job arrays use <array job id>_<task id>)
#   RUNS_DIR        parent of the default run folders (default: <repository>/runs)
#   EXTRA_ARGS      more recipe flags, e.g. "--epochs 100 --global-batch 1024 --report-to wandb"
#   PROCS_PER_NODE  training processes per node (alias GPUS_PER_NODE); default: SLURM_GPUS_ON_NODE,
#                   else the visible CUDA devices, else nvidia-smi's count; 1 when training on CPU
#                   (where 0, e.g. GPUS_PER_NODE=0 on a CPU partition, also means 1: a CPU rank uses
#                   the task's cores through threads)
#   DEVICE          auto | cuda | cpu (default auto: cuda when the node has GPUs). cpu sets
#                   ACCELERATE_USE_CPU=true (gloo): without it every rank would run as a world of one
#   ACCELERATE_CONFIG  an accelerate config file, e.g. recipes/accelerate/deepspeed_zero2.yaml for
#                   DeepSpeed; the topology flags here override its num_processes/machines. DeepSpeed
#                   multi-node goes through accelerate's "standard" launcher (one launcher per node
#                   started by srun), never pdsh/ssh
#   MASTER_ADDR     rendezvous host (default: first host of the allocation)
#   MASTER_PORT     rendezvous port (default: 10000 + job id % 20000, below the ephemeral port range,
#                   so two jobs sharing a node never collide; a requeued job reuses its port)
#   MAX_REQUEUES    requeue at most this many times (default 20; Slurm's SLURM_RESTART_COUNT counts)
#   PYTHON          interpreter with resnet-launcher installed (default: <repository>/.venv/bin/python
#                   if present, else python3 on PATH)
#   LAUNCHER_HOME   the repository, or for an installed package the folder the job runs in (default: found
#                   from the submitted script's path, else the
#                   submit directory); sbatch runs a copy of the script from its spool directory
# Network opt-ins, passed through untouched when set: NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME
#   (the interface the nodes reach each other on, e.g. ib0 or eth0), NCCL_DEBUG=INFO (connection
#   diagnostics), NCCL_IB_DISABLE, NCCL_P2P_DISABLE.

slurm_log() { echo "[slurm $(date +%H:%M:%S)] $*" >&2; }

# A local path made absolute against the submit directory (the training runs in the repository root);
# URLs and pipe: specs are left alone.
slurm_abspath() {
    case "$1" in
        "" | /* | *://* | pipe:*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

# Number of GPUs this node offers to the job (0 when none is visible).
slurm_detect_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" =~ ^[0-9]+$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "-1" ]]; then
        local devices
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#devices[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# The run folder: the same for every attempt of one job (the job id survives a requeue).
slurm_default_output() {
    local id="${SLURM_JOB_ID:-local-$$}"
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    echo "${RUNS_DIR:-$LAUNCHER_HOME/runs}/${SLURM_JOB_NAME:-job}-$id"
}

# Resolve every setting into SLURM_* shell variables and the two argument arrays.
slurm_resolve() {
    : "${LAUNCHER_HOME:?LAUNCHER_HOME is not set (the template sets it before sourcing common.sh)}"
    if [[ -z "${DATA:-}" && " ${EXTRA_ARGS:-} " != *" --data "* ]]; then
        slurm_log "error: DATA is not set: export DATA=/path/to/shards/NAME (a shardify folder, URL pattern or class-folder tree) before sbatch"
        return 2
    fi
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$LAUNCHER_HOME/.venv/bin/python" ]]; then
            PYTHON="$LAUNCHER_HOME/.venv/bin/python"
        else
            PYTHON="$(command -v python3 || true)"
        fi
    fi
    [[ -n "$PYTHON" ]] || { slurm_log "error: no python3 found; set PYTHON=/path/to/python"; return 2; }
    # Shipped recipes run as modules of the installed package (a checkout's venv or a plain wheel alike).
    case "${RECIPE:?RECIPE is not set}" in
        */* | *.py)
            RECIPE_SCRIPT="$(slurm_abspath "$RECIPE")"
            [[ -f "$RECIPE_SCRIPT" ]] || { slurm_log "error: recipe $RECIPE_SCRIPT not found (RECIPE=$RECIPE)"; return 2; }
            RECIPE_LAUNCH=("$RECIPE_SCRIPT") ;;
        finetune) RECIPE_SCRIPT="launcher.finetune.command"; RECIPE_LAUNCH=(-m "$RECIPE_SCRIPT") ;;
        a1 | a2 | a3) RECIPE_SCRIPT="launcher.train.command --recipe=$RECIPE"
            RECIPE_LAUNCH=(-m launcher.train.command "--recipe=$RECIPE") ;;
        *) slurm_log "error: RECIPE=$RECIPE (expected a1, a2, a3, finetune or a path to a recipe .py file)"; return 2 ;;
    esac

    NNODES="${SLURM_NNODES:-1}"
    local gpus device="${DEVICE:-auto}"
    gpus="$(slurm_detect_gpus)"
    case "$device" in
        auto) if ((gpus > 0)); then device=cuda; else device=cpu; fi ;;
        cpu | cuda) ;;
        *) slurm_log "error: DEVICE=$device (expected auto, cuda or cpu)"; return 2 ;;
    esac
    DEVICE="$device"
    # Processes per node: PROCS_PER_NODE, else its alias GPUS_PER_NODE (an empty value counts as unset).
    local procs="${PROCS_PER_NODE:-}" procs_from=PROCS_PER_NODE
    if [[ -z "$procs" && -n "${GPUS_PER_NODE:-}" ]]; then
        procs="$GPUS_PER_NODE"
        procs_from=GPUS_PER_NODE
    fi
    if [[ -n "$procs" ]] && ! [[ "$procs" =~ ^[0-9]+$ ]]; then
        slurm_log "error: $procs_from=$procs is not a number of processes per node (expected 1, 2, ...)"
        return 2
    fi
    if [[ "$DEVICE" == cpu ]]; then
        # accelerate needs this on CPU-only nodes, or each rank silently trains alone (world of one).
        export ACCELERATE_USE_CPU=true
        if [[ -z "$procs" ]]; then
            procs=1
        elif ((10#$procs == 0)); then
            slurm_log "note: $procs_from=$procs with DEVICE=cpu: 1 process per node (it uses the task's CPUs as threads)"
            procs=1
        fi
    elif [[ -z "$procs" ]]; then
        if ((gpus == 0)); then
            slurm_log "error: DEVICE=$DEVICE but no GPU is visible on this node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi); request GPUs (--gpus-per-node) or set DEVICE=cpu"
            return 2
        fi
        procs="$gpus"
    elif ((10#$procs == 0)); then
        slurm_log "error: $procs_from=$procs with DEVICE=$DEVICE leaves no training process on this node ($gpus GPU(s) visible); set $procs_from to the GPUs per node, or DEVICE=cpu for a CPU run"
        return 2
    fi
    PROCS_PER_NODE=$((10#$procs))
    NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))

    local first_host
    first_host="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -n 1)"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR="${first_host:-$(hostname)}"
        local resolved
        resolved="$(getent hosts "$MASTER_ADDR" | awk '{print $1; exit}')"
        if ((NNODES > 1)) && [[ "$resolved" == 127.* || "$resolved" == ::1 ]]; then
            slurm_log "warning: $MASTER_ADDR resolves to loopback ($resolved); other nodes cannot reach it on a real cluster: set MASTER_ADDR to an address they can reach (fine on a one-host test cluster)"
        fi
    fi
    MASTER_PORT="${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}"
    [[ -n "${RUNS_DIR:-}" ]] && RUNS_DIR="$(slurm_abspath "$RUNS_DIR")"
    OUTPUT="$(slurm_abspath "${OUTPUT:-$(slurm_default_output)}")"
    [[ -n "${DATA:-}" ]] && DATA="$(slurm_abspath "$DATA")"
    MAX_REQUEUES="${MAX_REQUEUES:-20}"
    RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"

    # CPU threads per process: the task's CPUs shared by the node's processes (never more than the
    # node has: an over-stated --cpus-per-task would otherwise oversubscribe every core).
    local cpus="${SLURM_CPUS_PER_TASK:-1}" online
    online="$(nproc 2>/dev/null || echo "$cpus")"
    ((online < cpus)) && cpus="$online"
    local threads=$((cpus / PROCS_PER_NODE))
    ((threads >= 1)) || threads=1
    LAUNCH_ARGS=(--num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --rdzv_backend static --num_cpu_threads_per_process "$threads" --dynamo_backend no)
    if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
        [[ -f "$ACCELERATE_CONFIG" ]] || ACCELERATE_CONFIG="$LAUNCHER_HOME/$ACCELERATE_CONFIG"
        ACCELERATE_CONFIG="$(slurm_abspath "$ACCELERATE_CONFIG")"
        [[ -f "$ACCELERATE_CONFIG" ]] || { slurm_log "error: ACCELERATE_CONFIG file ${ACCELERATE_CONFIG#"$LAUNCHER_HOME/"} not found"; return 2; }
        LAUNCH_ARGS=(--config_file "$ACCELERATE_CONFIG" "${LAUNCH_ARGS[@]}")
        if grep -qiE '^\s*distributed_type:\s*DEEPSPEED' "$ACCELERATE_CONFIG"; then
            # accelerate's default multi-node DeepSpeed launcher is pdsh (needs ssh between nodes).
            LAUNCH_ARGS+=(--use_deepspeed --deepspeed_multinode_launcher standard)
        elif ((NUM_PROCESSES > 1)); then
            LAUNCH_ARGS+=(--multi_gpu)
        fi
    else
        # Precision is the recipe's (--precision); this only silences accelerate's "defaults used" note.
        LAUNCH_ARGS+=(--mixed_precision no)
        # accelerate's multi-process launcher (torch elastic); with ACCELERATE_USE_CPU it runs over gloo.
        ((NUM_PROCESSES > 1)) && LAUNCH_ARGS+=(--multi_gpu)
    fi

    # --flag=value: one token per option, safe with parsers that pre-scan with parse_known_args.
    TRAIN_ARGS=(--output="$OUTPUT" --resume=auto --device="$DEVICE")
    [[ -n "${DATA:-}" ]] && TRAIN_ARGS+=(--data="$DATA")
    [[ -n "${MODEL:-}" ]] && TRAIN_ARGS+=(--model="$MODEL")
    local extra=()
    # EXTRA_ARGS is split on whitespace like a command line (no quoting inside it).
    [[ -n "${EXTRA_ARGS:-}" ]] && read -ra extra <<<"$EXTRA_ARGS"
    TRAIN_ARGS+=("${extra[@]}")
    export PYTHON OUTPUT LAUNCHER_HOME
}

# One node: run accelerate launch for this node's ranks and pass signals to them.
# Called by srun on every node as: slurm_node MACHINE_RANK ACCELERATE_ARGS... SCRIPT ARGS...
slurm_node() {
    local machine_rank="$1"
    shift
    local signalled="" launcher_pid rc
    # The launcher ignores USR1 and TERM (inherited SIG_IGN; torch elastic is told to leave TERM alone):
    # Slurm signals every process of the step, and a launcher that died or tore its workers down
    # would kill the ranks while they write the preemption checkpoint. The ranks install their own
    # handlers, so they still get the signal.
    (
        trap '' USR1 TERM
        export PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"
        exec "$PYTHON" -m accelerate.commands.launch --machine_rank "$machine_rank" "$@"
    ) &
    launcher_pid=$!
    # Ranks are the launcher's children. Slurm's step signal usually reaches them already; this forward
    # covers process trackers that miss them (torch elastic starts ranks in their own sessions).
    # The engine's handler only sets a flag, so a second delivery is harmless.
    trap 'signalled=USR1; pkill -USR1 -P "$launcher_pid" 2>/dev/null' USR1
    trap 'signalled=TERM; pkill -TERM -P "$launcher_pid" 2>/dev/null' TERM
    slurm_wait_exit "$launcher_pid"
    rc=$?
    if ((rc != 0)) && [[ -n "$signalled" ]]; then
        # Preempted ranks exit 75 and the launcher turns that into 1. Report success so that
        # --kill-on-bad-exit does not kill other nodes still writing their checkpoint; the batch
        # script decides from the run folder.
        echo "[slurm node $machine_rank] launcher exited $rc after SIG$signalled" >&2
        return 0
    fi
    return "$rc"
}

# Exit status of a background child. A trapped signal interrupts `wait` early (status > 128 while the
# child still runs), so wait again until the child is really gone.
slurm_wait_exit() {
    local pid=$1 status
    while true; do
        wait "$pid"
        status=$?
        kill -0 "$pid" 2>/dev/null || return "$status"
    done
}

slurm_job_state() {
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1
}

# Move a marker left by an earlier attempt into preemptions.jsonl (history), so that a stale marker
# can never make a failed attempt look preempted.
slurm_archive_marker() {
    local marker="$OUTPUT/PREEMPTED"
    [[ -f "$marker" ]] || return 0
    { tr -d '\n' <"$marker"; echo; } >>"$OUTPUT/preemptions.jsonl"
    rm -f "$marker"
}

slurm_main() {
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        slurm_log "error: not inside a Slurm job: submit this script with sbatch (on one machine, use accelerate launch recipes/<recipe>.py)"
        exit 2
    fi
    slurm_resolve || exit $?
    if [[ -z "${RECIPE_SCRIPT##launcher.*}" ]] && ! "$PYTHON" -c 'import launcher' 2>/dev/null; then
        slurm_log "error: $PYTHON cannot import resnet-launcher: set PYTHON to an interpreter where it is installed"
        exit 2
    fi
    mkdir -p "$OUTPUT"
    slurm_archive_marker
    slurm_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) attempt $((RESTART_COUNT + 1)) on ${SLURM_JOB_NODELIST:-$(hostname)}"
    slurm_log "recipe $RECIPE_SCRIPT, model ${MODEL:-recipe default}, data ${DATA:-from EXTRA_ARGS}"
    slurm_log "$NNODES node(s) x $PROCS_PER_NODE process(es) = $NUM_PROCESSES on $DEVICE; rendezvous $MASTER_ADDR:$MASTER_PORT"
    slurm_log "output $OUTPUT (resume auto)"
    [[ -n "${ACCELERATE_CONFIG:-}" ]] && slurm_log "accelerate config $ACCELERATE_CONFIG"

    local signalled="" srun_pid rc
    # SLURM_NODEID must be expanded on each node, hence the single quotes: in this batch shell it is 0
    # everywhere, and every node would claim machine rank 0 (and hang at the rendezvous).
    # The node side needs only these functions: they travel in srun's environment (export -f), so no
    # file of this script has to exist on the nodes.
    export -f slurm_node slurm_wait_exit
    # shellcheck disable=SC2016
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --chdir="$LAUNCHER_HOME" \
        bash -c 'slurm_node "$SLURM_NODEID" "$@"' slurm-node \
        "${LAUNCH_ARGS[@]}" "${RECIPE_LAUNCH[@]}" "${TRAIN_ARGS[@]}" &
    srun_pid=$!
    # srun passes USR1 on to every process of the step (see slurm_node for who acts on it). TERM must
    # not go through srun, which answers it by SIGKILLing the step; scancel without --batch/--full
    # signals the step's processes directly.
    trap 'signalled=USR1; slurm_log "USR1 received: asking the ranks to checkpoint"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
    trap 'signalled=TERM; slurm_log "TERM received: asking the ranks to checkpoint"; scancel --signal=TERM "$SLURM_JOB_ID"' TERM
    slurm_wait_exit "$srun_pid"
    rc=$?
    trap - USR1 TERM
    slurm_log "training step ended (srun exit $rc${signalled:+, after SIG$signalled})"

    if [[ -f "$OUTPUT/summary.json" && ! -f "$OUTPUT/PREEMPTED" ]]; then
        slurm_log "done: $OUTPUT/summary.json"
        exit 0
    fi
    if [[ -f "$OUTPUT/PREEMPTED" ]]; then
        slurm_log "preempted: $(tr -d '\n' <"$OUTPUT/PREEMPTED")"
        local state
        state="$(slurm_job_state)"
        if [[ "$state" == CANCELLED ]]; then
            slurm_log "job was cancelled: not requeueing (resume later with the same OUTPUT=$OUTPUT)"
            exit 75
        fi
        if ((RESTART_COUNT >= MAX_REQUEUES)); then
            slurm_log "error: requeued $RESTART_COUNT times already (MAX_REQUEUES=$MAX_REQUEUES): giving up; resubmit with OUTPUT=$OUTPUT to continue"
            exit 75
        fi
        slurm_log "requeueing job $SLURM_JOB_ID (restart $((RESTART_COUNT + 1)) of at most $MAX_REQUEUES)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        slurm_log "error: scontrol requeue failed; resubmit with OUTPUT=$OUTPUT to continue"
        exit 75
    fi
    if ((rc == 0)); then
        slurm_log "error: training exited 0 but wrote no $OUTPUT/summary.json"
        exit 1
    fi
    slurm_log "error: training failed (exit $rc); not requeueing"
    exit "$rc"
}
