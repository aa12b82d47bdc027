#!/usr/bin/env bash
# on_node.sh NODE CMD...  -- run CMD on a test node made by cluster.sh: its network namespace, its UTS
# namespace (host name) and its /etc/hosts (bound in a private mount namespace; unlike `ip netns exec`,
# /sys stays mounted as it is, so slurmd finds its cgroup file system).
set -euo pipefail
DIR=${MMP_MN_DIR:-/tmp/mmpretrain-multinode}
node=$1; shift
exec nsenter --net="/run/netns/$node" --uts="$DIR/uts/$node" -- \
    unshare --mount --propagation private -- \
    sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"' "$node" "$@"
