#!/usr/bin/env bash
# start_slurm.sh -- a throw-away single-node SLURM cluster for mmpretrain's tests:
# Debian's munge + slurmctld + slurmd run as plain background daemons (no systemd,
# no cgroups), with config, key, state, logs and pid files under one directory.
#
# Idempotent: when the cluster under $MMP_SLURM_DIR is up it only checks it.
# Needs root. Clients then need:  export SLURM_CONF=$MMP_SLURM_DIR/etc/slurm.conf
#
# Exit codes: 0 up; 77 cannot be started here (not root, no apt-get, install failed:
# the pytest fixture skips with the reason); 1 any other failure (the fixture fails).
#
# Knobs: MMP_SLURM_DIR [/tmp/mmpretrain-slurm]  MMP_SLURM_TIMEOUT [60 s per wait]
#        MMP_SLURM_CPUS [nproc]  MMP_SLURM_CTLD_PORT [6837]  MMP_SLURM_SLURMD_PORT [6838]
#        MMP_SLURM_CRED_EXPIRE [10 s; also the delay before a requeued job restarts]
# Based on the verified recipe in ../shared/slurm/RECIPE.md (pitfalls noted inline).
set -euo pipefail
umask 022

DIR=${MMP_SLURM_DIR:-/tmp/mmpretrain-slurm}
TIMEOUT=${MMP_SLURM_TIMEOUT:-60}
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
CPUS=${MMP_SLURM_CPUS:-$NCPU}
CTLD_PORT=${MMP_SLURM_CTLD_PORT:-6837}
SLURMD_PORT=${MMP_SLURM_SLURMD_PORT:-6838}
CRED_EXPIRE=${MMP_SLURM_CRED_EXPIRE:-10}
NODE=$(hostname -s)
CONF=$DIR/etc/slurm.conf
SOCK=$DIR/munge/munge.socket.2
KEY=$DIR/munge/munge.key
RUN=$DIR/run
LOG=$DIR/log
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
LOG_TAG=start_slurm
# shellcheck source=daemonlib.sh
. "$(dirname "$0")/daemonlib.sh"   # log/die/cannot, alive, munge_ok, wait_for, run_clean


[ "$(id -u)" = 0 ] || cannot "not root (installing and running slurmctld/slurmd/munged needs root)"
[ ${#SOCK} -lt 100 ] || die "munge socket path too long for a unix socket: $SOCK"

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"                        # start/stop are serialized
flock -w 600 9 || die "could not lock $DIR.lock"
export MMP_SLURM_LOCKED=1

ctld_up()    { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }
node_idle()  { case "$(node_state)" in idle*) return 0;; *) return 1;; esac; }
dump_logs() {
    for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd.log; do
        [ -f "$f" ] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
    done; return 0
}

if alive "$RUN/munged.pid" munged && alive "$RUN/slurmctld.pid" slurmctld \
   && alive "$RUN/slurmd.pid" slurmd && munge_ok && ctld_up; then
    case "$(node_state)" in
        idle*|mixed*|allocated*|completing*) log "already running; SLURM_CONF=$CONF"; exit 0 ;;
    esac
fi

# ------------------------------------------------------------------ install
missing() {
    local p
    for p in munge slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 0
    done
    return 1
}
if missing; then
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get"
    mkdir -p "$DIR"; APTLOG=$DIR/apt-install.log
    log "installing munge slurmctld slurmd slurm-client (log: $APTLOG)"
    made_policy=0   # postinst scripts must not start the system daemons (their /etc config)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
    fi
    inst() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                 -o DPkg::Lock::Timeout=300 munge slurmctld slurmd slurm-client; }
    ok=1
    if ! inst > "$APTLOG" 2>&1; then   # stale or empty package lists on a fresh machine
        apt-get update -q -o DPkg::Lock::Timeout=300 >> "$APTLOG" 2>&1 || true
        inst >> "$APTLOG" 2>&1 || ok=0
    fi
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || { tail -n 20 "$APTLOG" >&2; cannot "apt-get install of the SLURM packages failed (see $APTLOG)"; }
fi
for b in munged munge unmunge slurmctld slurmd sbatch srun squeue sinfo scontrol scancel; do
    command -v "$b" >/dev/null || die "$b not found after install"
done

# ------------------------------------------------------------------ fresh start
MMP_SLURM_DIR=$DIR "$(dirname "$0")/stop_slurm.sh" >/dev/null 2>&1 || true
for d in slurmd slurmctld munged; do
    alive "$RUN/$d.pid" "$d" && die "$d (pid $(cat "$RUN/$d.pid")) still running"
done
for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && die "port $p is in use (set MMP_SLURM_CTLD_PORT/MMP_SLURM_SLURMD_PORT)"
done
mkdir -p "$DIR"/etc "$DIR"/munge "$RUN" "$LOG" "$DIR"/state/ctld "$DIR"/state/d
rm -rf "$DIR"/state/ctld/* "$DIR"/state/d/* "$LOG/jobcomp.txt"   # job ids restart at 1
for f in "$LOG"/*.log; do [ -f "$f" ] && mv -f "$f" "$f.prev"; done
chmod 755 "$DIR" "$DIR"/munge "$RUN" "$LOG" "$DIR"/etc   # munged: socket dir must be o+x
rm -f "$SOCK" "$SOCK.lock" "$RUN"/*.pid

[ -s "$KEY" ] || mungekey -c -k "$KEY" 2>/dev/null || dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
chmod 600 "$KEY"
run_clean munged --socket="$SOCK" --key-file="$KEY" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$DIR/munge/munged.seed" </dev/null >>"$LOG/munged.stdout" 2>&1 \
    || { dump_logs; die "munged failed to start"; }
wait_for "$TIMEOUT" munged munge_ok || { dump_logs; die "munge does not work"; }

MEM=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
EXTRA=""
[ "$CPUS" -gt "$NCPU" ] && EXTRA="SlurmdParameters=config_overrides"
# cred_expire: a requeued job may restart after cred_expire+1 s (default 120).
# sched_interval/bf_interval=1: a job starts within ~1 s. EnforcePartLimits=ALL: an
# impossible request fails at sbatch instead of pending forever.
cat > "$CONF" <<EOF
# generated by tests/slurm/start_slurm.sh -- single-node test cluster
ClusterName=mmptest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
EnforcePartLimits=ALL
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
$EXTRA
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
printf 'export SLURM_CONF=%s\n' "$CONF" > "$DIR/env.sh"

run_clean slurmctld -i -f "$CONF" </dev/null >>"$LOG/slurmctld.stdout" 2>&1 || { dump_logs; die "slurmctld failed to start"; }
wait_for "$TIMEOUT" slurmctld ctld_up || { dump_logs; die "slurmctld does not answer"; }
run_clean slurmd -f "$CONF" -N "$NODE" </dev/null >>"$LOG/slurmd.stdout" 2>&1 || { dump_logs; die "slurmd failed to start"; }
wait_for "$TIMEOUT" "node $NODE idle" node_idle || { sinfo -N -l >&2 || true; dump_logs; die "node did not become idle"; }
log "cluster up: node $NODE, $CPUS CPUs, partition debug; export SLURM_CONF=$CONF"
