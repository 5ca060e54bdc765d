#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm.py: Debian's Slurm
# daemons (slurmctld, slurmd) and munge, every file of theirs under DIR.
#
#   tools/slurm_cluster.sh start DIR   # installs Slurm if missing; prints SLURM_CONF=DIR/slurm.conf
#   tools/slurm_cluster.sh stop DIR    # cancels its jobs, stops its daemons by their PIDs
#
# Client commands (sbatch, squeue, ...) reach it with SLURM_CONF=DIR/slurm.conf in their
# environment. Two partitions share the node: `low` (the default) and `high`, whose jobs
# preempt low ones (PreemptMode=REQUEUE: the preempted job gets its --signal at once, TERM
# GraceTime seconds later, and is requeued). No accounting (slurmdbd): sacct fails here.
# Needs root (the daemons, munge's key) and, when Slurm is missing, apt-get. Exit status 3
# says the cluster cannot run on this machine, with the reason on stderr.
# Works without systemd or cgroups (proctrack/linuxproc, task/none), as in a container.
set -euo pipefail

cannot() { echo "$*" >&2; exit 3; }

PACKAGES=(slurmctld slurmd slurm-client munge)

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get to install it"
    local log
    log=$(mktemp)
    # Package lists may be empty on a fresh machine: update once if the install fails.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "${PACKAGES[@]}" >"$log" 2>&1; then
        if ! { apt-get update >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1; }; then
            cannot "could not install Slurm with apt-get: $(grep -v '^\s*$' "$log" | tail -n1)"
        fi
    fi
    rm -f "$log"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 host mem node
    host=$(hostname -s)
    # What this machine has, as slurmd sees it; half its memory, so the node is never drained
    # for having less than configured.
    node=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=[0-9]+//')
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') / 2 ))
    cat >"$dir/slurm.conf" <<EOF
ClusterName=dptrain-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
# A requeued job starts again ~15 s later instead of ~2 min (the credential's lifetime).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=bf_interval=5,sched_interval=5
# Finished jobs stay visible to squeue and scontrol (there is no sacct here).
MinJobAge=3600
KillWait=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$node NodeAddr=127.0.0.1 RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

start() {
    local dir=$1
    [ "$(id -u)" = 0 ] || cannot "needs root: Slurm's daemons and munge run as root and munge here"
    install_slurm
    mkdir -p "$dir"/{state,spool,munge}
    chmod 755 "$dir"
    dir=$(cd "$dir" && pwd)
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge: "$dir/munge" && chmod 755 "$dir/munge"  # clients reach the socket
    runuser -u munge -- munged --socket="$dir/munge/munge.socket.2" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    local i state
    for i in $(seq 150); do
        state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
        [ "$state" = idle ] && { echo "SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    echo "the node did not come up (state: ${state:-none}); logs in $dir:" >&2
    tail -n5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    stop "$dir"
    exit 1
}

stop_pid() {  # the daemon whose PID is in file $1: TERM, then KILL after 10 s
    local file=$1 pid i
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1 i
    export SLURM_CONF=$dir/slurm.conf
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true  # no job outlives the cluster
        for i in $(seq 100); do  # their processes end within KillWait
            [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
