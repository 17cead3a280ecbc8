#!/usr/bin/env bash
# Runs the digits preset through a real single-node Slurm on this machine (`--executor slurm`)
# and checks that its summary.json has the same numbers as a local run (timings aside).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing (needs root), writes a
# throw-away configuration for this host under a temporary folder, starts munged, slurmctld and
# slurmd directly (containers have no systemd), and stops the daemons it started on exit.
# Every wait is bounded. Environment:
#   LMC_SLURM_TEST_TIMEOUT  seconds the Slurm run may take (default 1200)
#   LMC_SLURM_TEST_DIR      work folder (default: a new /tmp/lmc-slurm.XXXXXX)
#   LMC_SLURM_TEST_LOCAL    the local run's output folder to compare with (default: WORK/local,
#                           run here first; an existing finished folder is reused from cache)
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LMC_SLURM_TEST_TIMEOUT:-1200}
WORK=${LMC_SLURM_TEST_DIR:-$(mktemp -d /tmp/lmc-slurm.XXXXXX)}
LOCAL_OUT=${LMC_SLURM_TEST_LOCAL:-$WORK/local}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# mktemp makes the folder 0700; munged runs as the munge user and keeps its pid file below it.
chmod 755 "$WORK"
say() { echo "[slurm-test] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "needs root (to install and start the Slurm daemons)"
    exit 2
fi
need=0
for b in munged slurmctld slurmd sbatch squeue; do
    command -v "$b" >/dev/null || need=1
done
if [ "$need" = 1 ]; then
    say "installing slurmctld slurmd slurm-client munge"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge
fi

STARTED=()
cleanup() {
    for pidfile in "${STARTED[@]}"; do
        if [ -s "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT

# munge: a key, then the daemon unless one already answers.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge "$WORK/munge"
    chown munge:munge /run/munge "$WORK/munge"
    runuser -u munge -- munged --pid-file="$WORK/munge/munged.pid"
    STARTED+=("$WORK/munge/munged.pid")
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null
fi

# A single-node cluster: this host, with the CPUs and memory slurmd detects.
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1)
mkdir -p "$WORK/state" "$WORK/spool"
cat > "$WORK/slurm.conf" <<CONF
ClusterName=lmc-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
$NODE State=UNKNOWN
PartitionName=lmc Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$WORK/slurm.conf
slurmctld -c
STARTED+=("$WORK/slurmctld.pid")
slurmd
STARTED+=("$WORK/slurmd.pid")
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in idle* | mixed* | allocated*) break ;; esac
    sleep 1
done
case "$state" in
    idle* | mixed* | allocated*) say "node $HOST is $state" ;;
    *)
        say "node $HOST did not come up (state '$state'); logs in $WORK"
        exit 1
        ;;
esac

say "local reference run -> $LOCAL_OUT"
cargo xtask pipeline --preset digits --out "$LOCAL_OUT"
say "Slurm run -> $WORK/slurm (at most $LIMIT s)"
t0=$(date +%s)
run_slurm() {
    timeout "$((LIMIT + 60))" cargo xtask pipeline --preset digits --out "$WORK/slurm" \
        --executor slurm "$@" 2>&1 | tee -a "$WORK/pipeline.log"
}
# Submit without waiting, then kill slurmd while a stage runs and start it again: the rerun must
# find the queued and running jobs (submitting nothing twice) and complete.
run_slurm >/dev/null
running=""
for _ in $(seq 120); do
    running=$(squeue -h --me -t RUNNING -o %i | head -n 1)
    [ -n "$running" ] && break
    sleep 0.5
done
say "killing slurmd while job ${running:-?} runs, then starting it again"
kill "$(cat "$WORK/slurmd.pid")"
sleep 3
slurmd
run_slurm --wait "$LIMIT" | tee "$WORK/rerun.log" >/dev/null
grep -q "submitted 0 jobs" "$WORK/rerun.log" || {
    say "the rerun submitted stages that were already queued or running:"
    grep "submitted" "$WORK/rerun.log" >&2
    exit 1
}
say "Slurm run finished in $(($(date +%s) - t0)) s"
cargo xtask pipeline --preset digits --out "$WORK/slurm" --status | tail -n 1
cargo xtask same-summary "$LOCAL_OUT/report/summary.json" "$WORK/slurm/report/summary.json"
say "ok: the Slurm run's summary.json equals the local run's"
