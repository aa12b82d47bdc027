#!/usr/bin/env bash
# cluster.sh -- a throw-away 2-node cluster on one machine for mmpretrain's multi-node tests.
#
#   cluster.sh up     network namespaces node1/node2 joined by a veth pair (10.231.77.1/.2), each with
#                     its own loopback, host name (a UTS namespace: `hostname` says node1) and /etc/hosts
#                     (ip netns exec binds /etc/netns/NODE/hosts); an sshd per node (keys made here),
#                     pdsh; munged + slurmctld on node1 + a slurmd per node (NodeName=node[1-2]).
#                     Idempotent: a cluster that is up is only checked.
#   cluster.sh down   stops every process in both namespaces, deletes them; leaves nothing running.
#   cluster.sh node-up NODE   restarts NODE's sshd and slurmd (after a test killed the node).
#   on_node.sh NODE CMD...    runs CMD "on" a node (its network, host name and /etc/hosts).
#
# Traffic only between these namespaces: the veth pair has no route to anything else.
# Exit codes: 0 ok; 77 cannot be made here (not root, no `ip netns`, packages not installable: the
# pytest fixture skips with the reason); 1 any other failure.
# Knobs: MMP_MN_DIR [/tmp/mmpretrain-multinode]  MMP_MN_NET [10.231.77]  MMP_MN_TIMEOUT [60 s per wait]
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${MMP_MN_DIR:-/tmp/mmpretrain-multinode}
NET=${MMP_MN_NET:-10.231.77}
TIMEOUT=${MMP_MN_TIMEOUT:-60}
NODES=(node1 node2)
CONF=$DIR/slurm/etc/slurm.conf
SOCK=$DIR/slurm/munge/munge.socket.2
export SLURM_CONF=$CONF MMP_MN_DIR=$DIR
export PATH=$PATH:/usr/sbin:/sbin
LOG_TAG=cluster
# shellcheck source=../slurm/daemonlib.sh
. "$HERE/../slurm/daemonlib.sh"   # log/die/cannot, alive, munge_ok, wait_for, run_clean

on() { "$HERE/on_node.sh" "$@"; }
addr() { echo "$NET.${1#node}"; }
ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

install_packages() {
    local need=() p
    for p in openssh-server openssh-client pdsh munge slurmctld slurmd slurm-client iproute2; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
    done
    [ ${#need[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || cannot "missing packages ${need[*]} and no apt-get"
    mkdir -p "$DIR"; local aptlog=$DIR/apt-install.log made_policy=0
    log "installing ${need[*]} (log: $aptlog)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then   # postinst must not start the system's sshd/slurm daemons
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
    fi
    inst() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                 -o DPkg::Lock::Timeout=300 "${need[@]}"; }
    local ok=1
    if ! inst > "$aptlog" 2>&1; then
        apt-get update -q -o DPkg::Lock::Timeout=300 >> "$aptlog" 2>&1 || true
        inst >> "$aptlog" 2>&1 || ok=0
    fi
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || { tail -n 20 "$aptlog" >&2; cannot "apt-get install ${need[*]} failed (see $aptlog)"; }
}

# ------------------------------------------------------------------ network and host names
make_nodes() {
    mkdir -p "$DIR/uts" /run/sshd
    for n in "${NODES[@]}"; do
        ip netns add "$n" 2>/dev/null || ip netns list | grep -qw "^$n" || cannot "ip netns add $n failed"
        mkdir -p "/etc/netns/$n"
        { echo "127.0.0.1 localhost"; for m in "${NODES[@]}"; do echo "$(addr "$m") $m"; done; } > "/etc/netns/$n/hosts"
        echo "$n" > "/etc/netns/$n/hostname"
        # a persistent UTS namespace per node: `hostname` (and gethostname) say node1 / node2
        if ! mountpoint -q "$DIR/uts/$n"; then
            : > "$DIR/uts/$n"
            unshare --uts="$DIR/uts/$n" hostname "$n" || cannot "unshare --uts failed"
        fi
        ip -n "$n" link set lo up
    done
    if ! ip -n node1 link show veth-node1 >/dev/null 2>&1; then
        ip link add veth-node1 type veth peer name veth-node2 || cannot "cannot create a veth pair"
        ip link set veth-node1 netns node1
        ip link set veth-node2 netns node2
    fi
    for n in "${NODES[@]}"; do
        ip -n "$n" addr replace "$(addr "$n")/24" dev "veth-$n"
        ip -n "$n" link set "veth-$n" up
    done
    [ "$(on node1 hostname)" = node1 ] && [ "$(on node2 getent hosts node1 | cut -d" " -f1)" = "$(addr node1)" ] \
        || die "node names do not resolve inside the namespaces"
}

# ------------------------------------------------------------------ ssh
make_ssh() {
    local s=$DIR/ssh; mkdir -p "$s"; chmod 700 "$s"
    [ -s "$s/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C mmpretrain-test -f "$s/id_ed25519"
    cp "$s/id_ed25519.pub" "$s/authorized_keys"; chmod 600 "$s/authorized_keys"
    cat > "$s/ssh_config" <<EOF
Host node1 node2
    User root
    IdentityFile $s/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 5
EOF
    # `ssh` as the deepspeed launcher and pdsh call it (a bare `ssh HOST`): this cluster's keys and
    # options, as a user's ~/.ssh/config would give them; tests put $DIR/bin first on PATH
    mkdir -p "$DIR/bin"
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$s/ssh_config" > "$DIR/bin/ssh"
    chmod 755 "$DIR/bin/ssh"
    for n in "${NODES[@]}"; do
        mkdir -p "$s/$n"
        [ -s "$s/$n/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$s/$n/host_key"
        cat > "$s/$n/sshd_config" <<EOF
ListenAddress $(addr "$n")
Port 22
HostKey $s/$n/host_key
PidFile $s/$n/sshd.pid
AuthorizedKeysFile $s/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
LogLevel ERROR
EOF
    done
}
start_sshd() {
    local s=$DIR/ssh n=$1
    ssh_ok "$n" && return 0
    run_clean "$HERE/on_node.sh" "$n" /usr/sbin/sshd -f "$s/$n/sshd_config" -E "$s/$n/sshd.log" </dev/null \
        || die "sshd on $n failed to start: $(tail -n 5 "$s/$n/sshd.log" 2>/dev/null)"
    wait_for "$TIMEOUT" "ssh to $n" ssh_ok "$n" || die "cannot ssh to $n: $(tail -n 5 "$s/$n/sshd.log" 2>/dev/null)"
}
ssh_ok() { [ "$(on node1 ssh -F "$DIR/ssh/ssh_config" "$1" hostname 2>/dev/null)" = "$1" ]; }

# ------------------------------------------------------------------ SLURM
ctld_up() { on node1 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_idle() { case "$(on node1 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1)" in idle*) return 0;; *) return 1;; esac; }

make_slurm() {
    local d=$DIR/slurm
    mkdir -p "$d/etc" "$d/munge" "$d/run" "$d/log" "$d/state/ctld" "$d/state/spool"
    chmod 755 "$d" "$d/munge" "$d/run" "$d/log" "$d/etc"
    if ! { alive "$d/run/munged.pid" munged && munge_ok; }; then
        rm -f "$SOCK" "$SOCK.lock"
        [ -s "$d/munge/munge.key" ] || mungekey -c -k "$d/munge/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$d/munge/munge.key" bs=1 count=1024 status=none
        chmod 600 "$d/munge/munge.key"
        # the munge socket is a file: reachable from both namespaces (one munged serves the cluster)
        run_clean munged --socket="$SOCK" --key-file="$d/munge/munge.key" --pid-file="$d/run/munged.pid" \
            --log-file="$d/log/munged.log" --seed-file="$d/munge/munged.seed" </dev/null >/dev/null 2>&1 \
            || die "munged failed to start"
        wait_for "$TIMEOUT" munged munge_ok || die "munge does not work"
    fi
    local mem; mem=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.4 }' /proc/meminfo)
    cat > "$CONF" <<EOF
# generated by tests/multinode/cluster.sh -- two nodes in network namespaces
ClusterName=mmpmulti
SlurmctldHost=node1($(addr node1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$d/state/ctld
SlurmdSpoolDir=$d/state/spool/%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd.%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$d/log/jobcomp.txt
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
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName=node1 NodeAddr=$(addr node1) CPUs=4 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=$(addr node2) CPUs=4 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
EOF
    mkdir -p "$d/state/spool/node1" "$d/state/spool/node2"
    if ! { alive "$d/run/slurmctld.pid" slurmctld && ctld_up; }; then
        rm -rf "$d/state/ctld/"*
        run_clean "$HERE/on_node.sh" node1 slurmctld -i -f "$CONF" </dev/null >>"$d/log/slurmctld.stdout" 2>&1 \
            || die "slurmctld failed to start: $(tail -n 5 "$d/log/slurmctld.log")"
        wait_for "$TIMEOUT" slurmctld ctld_up || die "slurmctld does not answer: $(tail -n 5 "$d/log/slurmctld.log")"
    fi
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
}
start_slurmd() {
    local d=$DIR/slurm n=$1
    if ! alive "$d/run/slurmd.$n.pid" slurmd; then
        run_clean "$HERE/on_node.sh" "$n" slurmd -f "$CONF" -N "$n" </dev/null >>"$d/log/slurmd.$n.stdout" 2>&1 \
            || die "slurmd on $n failed to start: $(tail -n 5 "$d/log/slurmd.$n.log")"
    fi
    # a node that was killed comes back DOWN*: ReturnToService=2 returns it once it registers
    wait_for "$TIMEOUT" "$n idle" node_idle "$n" \
        || die "$n did not become idle: $(on node1 sinfo -N -l 2>&1) $(tail -n 5 "$d/log/slurmd.$n.log")"
}

# ------------------------------------------------------------------ down
down() {
    for n in "${NODES[@]}"; do
        local pids; pids=$(ns_pids "$n")
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    done
    local d=$DIR/slurm
    [ -f "$d/run/munged.pid" ] && kill "$(cat "$d/run/munged.pid")" 2>/dev/null || true
    for i in $(seq 50); do [ -z "$(ns_pids node1)$(ns_pids node2)" ] && break; sleep 0.1; done
    for n in "${NODES[@]}"; do
        ip netns del "$n" 2>/dev/null || true
        mountpoint -q "$DIR/uts/$n" 2>/dev/null && umount "$DIR/uts/$n" || true
        rm -rf "/etc/netns/$n"
    done
    rm -f "$d/run/"*.pid
}

case "${1:-}" in
    up)
        [ "$(id -u)" = 0 ] || cannot "not root (network namespaces, sshd and slurmd need root)"
        command -v ip >/dev/null || cannot "no ip command (iproute2)"
        command -v unshare >/dev/null && command -v nsenter >/dev/null || cannot "no unshare/nsenter (util-linux)"
        mkdir -p "$(dirname "$DIR")"
        exec 9>"$DIR.lock"; flock -w 600 9 || die "could not lock $DIR.lock"
        install_packages
        make_nodes
        make_ssh
        for n in "${NODES[@]}"; do start_sshd "$n"; done
        make_slurm
        log "up: node1 $(addr node1), node2 $(addr node2); ssh -F $DIR/ssh/ssh_config; SLURM_CONF=$CONF"
        ;;
    node-up)
        start_sshd "$2"; start_slurmd "$2" ;;
    down)
        exec 9>"$DIR.lock"; flock -w 600 9 || die "could not lock $DIR.lock"
        down; log "down" ;;
    *) echo "usage: $0 up|down|node-up NODE" >&2; exit 2 ;;
esac
