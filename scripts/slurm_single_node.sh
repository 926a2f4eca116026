#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and CI (run as root):
#
#   scripts/slurm_single_node.sh          # set up (if needed) and start munged, slurmctld, slurmd
#   scripts/slurm_single_node.sh stop     # stop the daemons this script started
#
# Needs the Debian packages slurm-wlm and munge (apt-get install slurm-wlm munge). Idempotent:
# running daemons are left alone, the configuration is rewritten only when it changes.
# No systemd: the daemons are started directly (as in a container). No cgroups: process
# tracking by /proc (proctrack/linuxproc), no task binding, select/cons_tres with cores
# and memory as consumable resources, and one partition "regular", the queue of
# pipelines/cluster/slurm.toml. The node carries the feature "cpu" that profile asks for.
# Everything listens on this host only (SlurmctldHost is this host's own name).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
HOST=$(hostname -s)
PARTITION=${SLURM_PARTITION:-regular}

die() { echo "slurm_single_node: $*" >&2; exit 1; }

if [[ ${1:-} == stop ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")" && echo "stopped $(basename "$pidfile" .pid)"
        fi
    done
    exit 0
fi

[[ $(id -u) == 0 ]] || die "run as root (it writes $CONF and starts the daemons)"
for exe in munged slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$exe" >/dev/null || die "$exe not found: apt-get install slurm-wlm munge"
done

# -- munge: a key, then the daemon (as the munge user, as the package intends) -------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# -- slurm.conf for this host: what slurmd -C measures, less 1 GB of memory for the system ---
node=$(slurmd -C | head -n 1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(( mem > 2048 ? mem - 1024 : mem ))
topology=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$node")
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
new=$(mktemp)
cat >"$new" <<EOF
# written by scripts/slurm_single_node.sh
ClusterName=single
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
MailProg=/bin/true
KillWait=5
NodeName=$HOST CPUs=$cpus $topology RealMemory=$mem Features=cpu State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! cmp -s "$new" "$CONF"; then
    mv "$new" "$CONF"
    chmod 0644 "$CONF"
    changed=1
else
    rm -f "$new"
fi

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if running /run/slurmctld.pid; then
    [[ $changed == 1 ]] && scontrol reconfigure
else
    slurmctld
fi
running /run/slurmd.pid || slurmd

# -- wait for the node to come up, and bring it back if an earlier run left it down ----------
for _ in $(seq 100); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1 || true)
    case $state in
        idle*|mix*|alloc*) echo "slurm_single_node: $HOST up ($cpus CPUs, $mem MB) in partition $PARTITION"; exit 0 ;;
        down*|drain*|drng*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
die "node $HOST not idle (state '${state:-?}'; see $LOGS/slurmctld.log and $LOGS/slurmd.log)"
