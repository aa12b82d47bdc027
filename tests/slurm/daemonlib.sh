# daemonlib.sh -- shell helpers the test clusters share (sourced by tests/slurm/start_slurm.sh and
# tests/multinode/cluster.sh). Set LOG_TAG before sourcing; munge_ok reads $SOCK.
log() { echo "[${LOG_TAG:-cluster} $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
cannot() { log "SKIP: $*"; exit 77; }
alive() {   # alive PIDFILE COMM: pid alive, named COMM, not a zombie (pid 1 may reap slowly)
    local p
    p=$(cat "$1" 2>/dev/null) || return 1
    [[ $p =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
}
munge_ok() { munge -n -S "$SOCK" 2>/dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; }
wait_for() { # wait_for SECONDS WHAT CMD...
    local end=$(( SECONDS + $1 )) what=$2; shift 2
    until "$@"; do
        [ $SECONDS -lt $end ] || { log "timeout waiting for $what"; return 1; }
        sleep 0.3
    done
}
run_clean() { # daemons must not inherit our fds (a CI runner's pipe would never reach EOF)
    ( for f in /proc/self/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-"; done
      exec "$@" )
}
