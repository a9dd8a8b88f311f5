#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for the Slurm tests (tests/test_slurm*.py).
#
#   .ci/slurm/cluster.sh start    install (if absent) and start munged, slurmctld, slurmd -N n1, slurmd -N n2
#   .ci/slurm/cluster.sh status   scontrol ping + sinfo; exit 0 only when both nodes are usable
#   .ci/slurm/cluster.sh stop     stop the daemons this script started (by their pid files)
#   .ci/slurm/cluster.sh logs     print the tails of the daemon logs (for CI diagnostics)
#
# Needs root and Debian/Ubuntu (apt). Installs `slurm-wlm munge shellcheck` with
# --no-install-recommends when they are missing. No systemd: the daemons are started directly.
#
# Layout: Debian's Slurm is built with MULTIPLE_SLURMD, so two slurmd run on this host under the
# node names n1 and n2 (own ports, NodeAddr=127.0.0.1, "127.0.0.1 n1 n2" added to /etc/hosts).
# Each node advertises 8 fake GPUs (count-only gres) and more CPUs/memory than the machine has
# (SlurmdParameters=config_overrides), so the templates' production-sized #SBATCH lines are accepted.
# Scheduling is tuned for fast tests: a requeued job restarts within seconds, not minutes.
#
# Environment: SLURM_CI_NODE_CPUS (default 256), SLURM_CI_NODE_MEM_MB (default 1024000),
#              SLURM_CI_GPUS (default 8), SLURM_CI_STATE (default /var/lib/slurm-ci).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by resnet-launcher .ci/slurm/cluster.sh"
STATE="${SLURM_CI_STATE:-/var/lib/slurm-ci}"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/log"
NODE_CPUS="${SLURM_CI_NODE_CPUS:-256}"
NODE_MEM="${SLURM_CI_NODE_MEM_MB:-1024000}"
GPUS="${SLURM_CI_GPUS:-8}"
NODES=(n1 n2)
PORTS=(17001 17002)

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The daemons' maintainer scripts try to start services; without systemd that is refused, harmlessly.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE/ctld" "$STATE/spool-${NODES[0]}" "$STATE/spool-${NODES[1]}"
    # GPUs need device files; char devices like /dev/null stand in (nothing ever opens them).
    local node gpu gres_line=""
    local gres_conf="$MARKER"$'\n'
    if ((GPUS > 0)); then
        mkdir -p "$STATE/dev"
        for node in "${NODES[@]}"; do
            for ((gpu = 0; gpu < GPUS; gpu++)); do
                [[ -c "$STATE/dev/$node-gpu$gpu" ]] || mknod "$STATE/dev/$node-gpu$gpu" c 1 3 2>/dev/null || break 2
            done
            gres_conf+="NodeName=$node Name=gpu File=$STATE/dev/$node-gpu[0-$((GPUS - 1))]"$'\n'
        done
        if [[ -c "$STATE/dev/${NODES[1]}-gpu$((GPUS - 1))" ]]; then
            gres_line="Gres=gpu:$GPUS"
        else
            log "mknod is not permitted here: the nodes get no fake GPUs"
            gres_conf="$MARKER"$'\n'
        fi
    fi
    printf '%s' "$gres_conf" >"$CONF_DIR/gres.conf"
    local host
    host="$(hostname -s)"
    {
        echo "$MARKER"
        cat <<EOF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits for its old credential to expire (default 120 s) before it may start again.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Fast cycles for tests: schedule every 2 s, keep finished jobs visible to scontrol for an hour.
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
KillWait=10
# Preemption sends the job's --signal (USR1: checkpoint and requeue) instead of only SIGTERM.
SlurmctldParameters=preempt_send_user_signal
MessageTimeout=20
SlurmdTimeout=60
InactiveLimit=0
GresTypes=gpu
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$NODE_CPUS RealMemory=$NODE_MEM $gres_line State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$NODE_CPUS RealMemory=$NODE_MEM $gres_line State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    } >"$CONF"
    # The node names must resolve on this host (srun, scontrol show hostnames, the rendezvous address).
    if ! grep -qE "^127\.0\.0\.1\s.*\bn1\b.*\bn2\b" /etc/hosts; then
        echo "127.0.0.1 ${NODES[0]} ${NODES[1]}" >>/etc/hosts
    fi
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -f /etc/munge/munge.key ]] || {
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # --force: start even over a stale socket left by a killed munged (CI machines are reused).
    runuser -u munge -- /usr/sbin/munged --force
    local _
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not come up"
}

nodes_ready() {
    # Both nodes idle/mixed/allocated (not down, drained or unknown).
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    [[ "$(grep -cE ' (idle|mix|alloc)$' <<<"$states")" == "${#NODES[@]}" ]]
}

start() {
    [[ "$(id -u)" == 0 ]] || die "needs root (installs packages, writes $CONF, starts daemons)"
    install_packages
    local before=""
    [[ -f "$CONF" ]] && before="$(cat "$CONF" "$CONF_DIR/gres.conf" 2>/dev/null)"
    write_config
    if [[ "$before" != "$(cat "$CONF" "$CONF_DIR/gres.conf")" ]] && alive "$RUN_DIR/slurmctld.pid"; then
        log "configuration changed: restarting the daemons"
        stop
        sleep 1
    fi
    start_munge
    if ! alive "$RUN_DIR/slurmctld.pid"; then
        # -c: start from a clean job state; -i: ignore stale state files.
        slurmctld -c -i
    fi
    local node
    for node in "${NODES[@]}"; do
        alive "$RUN_DIR/slurmd-$node.pid" || slurmd -N "$node"
    done
    local _
    for _ in $(seq 150); do
        if nodes_ready; then
            log "cluster up: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')"
            return 0
        fi
        # A node left DOWN by an earlier run comes back with an explicit resume.
        if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(down|drain)'; then
            scontrol update NodeName="${NODES[0]},${NODES[1]}" State=RESUME 2>/dev/null || true
        fi
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    logs
    die "nodes did not become ready"
}

stop() {
    local pidfile
    for pidfile in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmctld.pid"; do
        [[ -f "$pidfile" ]] || continue
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    if [[ -f /run/munge/munged.pid ]] && alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    log "stopped"
}

status() {
    command -v scontrol >/dev/null || { log "slurm is not installed"; return 1; }
    scontrol ping && sinfo -N -l && nodes_ready
}

logs() {
    local file
    for file in "$LOG_DIR"/*.log; do
        [[ -f "$file" ]] || continue
        echo "===== $file"
        tail -n 30 "$file"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    logs) logs ;;
    *) echo "usage: $0 start|stop|status|logs" >&2; exit 2 ;;
esac
