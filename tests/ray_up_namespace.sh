#!/usr/bin/env bash
# Three machines inside the test's own namespaces, for tests/test_ray_up.py:
#
#   unshare --pid --fork --mount-proc --net --mount bash tests/ray_up_namespace.sh BASE VENV PYTHON_HOME -- COMMAND...
#
# This script is PID 1 of a fresh PID, network and mount namespace (killing it ends everything below it).
# It makes a bridge with the user's machine on it (10.250.0.10, where COMMAND runs) and two nodes, each in
# a network, PID and mount namespace of its own, joined to the bridge by a veth pair: the head at 10.250.0.1
# and a worker at 10.250.0.2. Each node runs Debian's sshd on port 22 of its own address and has a home
# (/root), /tmp and a copy-on-write view of VENV (an overlay: pip writes stay in BASE) of its own, so its
# `ray stop`, ports, ~/.ray and /tmp/ray touch nothing outside. /mnt/shared is one directory both nodes
# see (an NFS export's stand-in, for run.storage_path); the user's machine does not. No other address exists in here: nothing
# reaches the internet or the package index, so what setup_commands install is prepared in BASE first.
#
# PYTHON_HOME is the venv's base Python (sys.base_prefix): if it lives under /root (pyenv), it is mounted
# back into each machine's own /root at the same path.
# BASE (prepared by the test): client/home (with .ssh/id_ed25519 and the checkout), client/tmp,
# head/home and worker/home (.ssh/authorized_keys, .sshd/ host key), head/tmp, worker/tmp.
set -euo pipefail

keep_python() {   # after a home was mounted on /root: the base Python back at its path, if it was there
    if [[ "$1" == /root/* ]]; then
        mkdir -p "$1"
        mount --bind /run/base-python "$1"
    fi
}

if [[ "${1:-}" == "--node" ]]; then   # inside a node's namespaces: mounts, then sshd in the foreground
    node=$2 base=$3 venv=$4 ip=$5 pyhome=$6
    mkdir -p "$base/$node/venv-upper" "$base/$node/venv-work"
    mount -t overlay overlay -o "lowerdir=$venv,upperdir=$base/$node/venv-upper,workdir=$base/$node/venv-work" "$venv"
    mount --bind "$base/$node/home" /root
    keep_python "$pyhome"
    mount --bind "$base/$node/tmp" /tmp     # last: BASE may live under /tmp
    cat > /root/.sshd/sshd_config <<EOF
ListenAddress $ip
Port 22
HostKey /root/.sshd/host_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
PidFile none
Subsystem sftp internal-sftp
EOF
    /usr/sbin/sshd -D -e -f /root/.sshd/sshd_config >> /root/.sshd/log 2>&1 &
    wait
    exit 0
fi

base=$1 venv=$2 pyhome=$3
shift 3
[[ "${1:-}" == "--" ]] && shift

mount --make-rprivate /
mount -t tmpfs tmpfs /run       # /run/netns, /run/sshd: this namespace's own
mount -t tmpfs tmpfs /mnt
mkdir -p /run/sshd /mnt/shared /run/base-python
chmod 0755 /run/sshd
mount --bind "$pyhome" /run/base-python

ip link set lo up
ip link add br0 type bridge
ip addr add 10.250.0.10/24 dev br0
ip link set br0 up

declare -A addr=([head]=10.250.0.1 [worker]=10.250.0.2)
for node in head worker; do
    ip netns add "$node"
    ip link add "v-$node" type veth peer name eth0 netns "$node"
    ip link set "v-$node" master br0 up
    ip -n "$node" link set lo up
    ip -n "$node" addr add "${addr[$node]}/24" dev eth0
    ip -n "$node" link set eth0 up
    # A default route on the bridge, so Ray finds the node's address (it asks which source address a packet
    # to a public address would leave from); such packets reach no one: there is nothing beyond the bridge.
    ip -n "$node" route add default dev eth0
    ip netns exec "$node" unshare --pid --fork --mount-proc --mount \
        bash "$0" --node "$node" "$base" "$venv" "${addr[$node]}" "$pyhome" &
done

# The user's machine: a home and /tmp of its own (~/.ray, ~/.ssh, the launcher's state in /tmp/ray).
mount --bind "$base/client/home" /root
keep_python "$pyhome"
export HOME=/root
for node in head worker; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/${addr[$node]}/22") 2>/dev/null && break
        sleep 0.1
    done
done
mount --bind "$base/client/tmp" /tmp
mount -t tmpfs tmpfs /mnt   # the nodes' shared storage is theirs: the user's machine reads what rsync-down brings
cd /root/raycv
"$@"
