#!/usr/bin/env bash
# stop_slurm.sh -- stop the test cluster started by start_slurm.sh: cancel its jobs, then
# TERM (later KILL) the daemons named in its pid files, checking each pid's name first.
#   --purge   also delete $MMP_SLURM_DIR (config, state, logs, munge key)
set -uo pipefail

DIR=${MMP_SLURM_DIR:-/tmp/mmpretrain-slurm}
RUN=$DIR/run
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
log() { echo "[stop_slurm $(date +%T)] $*" >&2; }

if [ "${MMP_SLURM_LOCKED:-0}" != 1 ] && [ -d "$(dirname "$DIR")" ]; then
    exec 9>"$DIR.lock"
    flock -w 600 9 || log "warning: could not lock $DIR.lock"
fi

pid_of() {  # pid_of NAME: the pid from NAME.pid when that process is still NAME
    local p
    p=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
    [[ $p =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ] && echo "$p"
}
running() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; }
stop_one() {
    local p i
    if p=$(pid_of "$1") && running "$p" "$1"; then
        kill -TERM "$p" 2>/dev/null
        for i in $(seq 1 40); do running "$p" "$1" || break; sleep 0.25; done
        running "$p" "$1" && { log "$1 ($p) ignored TERM; KILL"; kill -KILL "$p" 2>/dev/null; sleep 0.5; }
        log "stopped $1 ($p)"
    fi
    rm -f "$RUN/$1.pid"
}

if pid_of slurmctld >/dev/null && [ -f "$CONF" ]; then
    jobs=$(timeout 10 squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        timeout 10 scancel $jobs 2>/dev/null || true
        for i in $(seq 1 40); do
            [ -z "$(timeout 5 squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi
stop_one slurmd
stop_one slurmctld
stop_one munged
rm -f "$DIR/munge/munge.socket.2" "$DIR/munge/munge.socket.2.lock"

if [ "${1:-}" = --purge ]; then
    case "$DIR" in /|/tmp|/root|/home|"") log "refusing to purge '$DIR'";; *) rm -rf "$DIR"; log "purged $DIR";; esac
fi
exit 0
