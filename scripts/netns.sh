#!/usr/bin/env bash
# Two "hosts" on one machine for multi-node tests (tests/multinode, tests/slurm): network
# namespaces joined by a bridge, each with its own address, hostname and /etc/hosts.
#
#   scripts/netns.sh up        # create the namespaces, veth pairs and bridge (idempotent)
#   scripts/netns.sh status    # what exists; exit 0 when everything is up, 3 when not
#   scripts/netns.sh exec N CMD...   # run CMD on node N (1, 2): its namespace, its hostname
#   scripts/netns.sh nodes     # one line per node: name ip
#   scripts/netns.sh down      # stop what still runs in the namespaces, remove everything (idempotent)
#
# Layout (private addresses only; nothing but these addresses and loopback is touched):
#   bridge recipe-br0 in the root namespace, 10.213.0.1/24 (the "head end": slurmctld and
#   the test driver reach the nodes through it); node N: namespace recipe-nN, hostname
#   recipe-nN, address 10.213.0.(10+N) on its eth0 (the inside end of veth pair recipe-vN),
#   loopback up, and /etc/netns/recipe-nN/hosts naming every node. `exec` runs the command
#   in the node's network namespace and in UTS and mount namespaces of its own: hostname
#   recipe-nN and that hosts file bound on /etc/hosts, so gethostname() resolves to the
#   node's address (what gloo binds to).
#   The filesystem is shared: both nodes see the same /tmp, repository and venv.
#
# Exit status: 0 ok, 1 a step failed, 2 usage, 3 cannot run here (not root / no
# CAP_NET_ADMIN, or `ip netns add` refused): tests skip on 3.
#
# Environment:
#   RECIPE_NETNS_NODES   number of nodes (default 2, at most 9)
#   RECIPE_NETNS_PREFIX  names of namespaces and hostnames (default recipe-n)
#   RECIPE_NETNS_SUBNET  first three octets of the /24 (default 10.213.0; must be private)
set -euo pipefail

NODES="${RECIPE_NETNS_NODES:-2}"
PREFIX="${RECIPE_NETNS_PREFIX:-recipe-n}"
SUBNET="${RECIPE_NETNS_SUBNET:-10.213.0}"
BRIDGE=recipe-br0
BRIDGE_IP="$SUBNET.1"
export PATH="/usr/sbin:/sbin:$PATH"

die() { echo "[netns] error: $*" >&2; exit 1; }
unavailable() { echo "[netns] unavailable: $*" >&2; exit 3; }
say() { echo "[netns] $*"; }

case "$NODES" in [1-9]) ;; *) echo "[netns] RECIPE_NETNS_NODES=$NODES: expected 1..9" >&2; exit 2 ;; esac
case "$SUBNET" in
  10.*.*|192.168.*|172.1[6-9].*|172.2[0-9].*|172.3[01].*) ;;
  *) echo "[netns] RECIPE_NETNS_SUBNET=$SUBNET is not a private (RFC 1918) prefix" >&2; exit 2 ;;
esac

ns_name() { echo "$PREFIX$1"; }
node_ip() { echo "$SUBNET.$((10 + $1))"; }
veth() { echo "recipe-v$1"; }   # host end; the namespace end is renamed eth0
hosts_file() { echo "/etc/netns/$(ns_name "$1")/hosts"; }

# (outputs captured first: with pipefail, `cmd | grep -q` fails when grep exits early)
ns_exists() { local l; l=$(ip netns list 2>/dev/null | awk '{print $1}'); grep -qx -- "$1" <<<"$l"; }
# has_addr IP [NS]: eth0 of NS (the bridge without NS) carries IP/24
has_addr() {
  local out
  if [ -n "${2:-}" ]; then out=$(ip -n "$2" addr show dev eth0 2>/dev/null) || return 1
  else out=$(ip addr show dev $BRIDGE 2>/dev/null) || return 1; fi
  grep -q "inet $1/24" <<<"$out"
}
link_exists() { ip link show "$1" >/dev/null 2>&1; }

need_rights() {
  [ "$(id -u)" = 0 ] || unavailable "needs root (ip netns add, veth pairs, a bridge); run it as root or with sudo"
  command -v ip >/dev/null || unavailable "the 'ip' command (iproute2) is missing"
  command -v unshare >/dev/null && command -v nsenter >/dev/null \
    || unavailable "the 'unshare' / 'nsenter' commands (util-linux) are missing"
  local capeff
  capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
  # CAP_NET_ADMIN is bit 12, CAP_SYS_ADMIN (namespaces, mounts) bit 21
  if [ -n "$capeff" ]; then
    (( (16#$capeff >> 12) & 1 )) || unavailable "no CAP_NET_ADMIN (CapEff=$capeff): cannot create namespaces or links"
    (( (16#$capeff >> 21) & 1 )) || unavailable "no CAP_SYS_ADMIN (CapEff=$capeff): cannot create namespaces"
  fi
}

cmd_up() {
  need_rights
  local i ns ip v
  if ! link_exists $BRIDGE; then
    ip link add $BRIDGE type bridge 2>/tmp/recipe-netns.err \
      || unavailable "cannot create bridge $BRIDGE: $(cat /tmp/recipe-netns.err)"
    say "bridge $BRIDGE created"
  fi
  has_addr "$BRIDGE_IP" || ip addr add "$BRIDGE_IP/24" dev $BRIDGE
  ip link set $BRIDGE up
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_name "$i"); ip=$(node_ip "$i"); v=$(veth "$i")
    if ! ns_exists "$ns"; then
      ip netns add "$ns" 2>/tmp/recipe-netns.err || unavailable "ip netns add $ns failed: $(cat /tmp/recipe-netns.err)"
      say "namespace $ns created"
    fi
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      link_exists "$v" && ip link del "$v"   # a half-made pair of an earlier attempt
      ip link add "$v" type veth peer name "$v-in"
      ip link set "$v-in" netns "$ns"
      ip -n "$ns" link set "$v-in" name eth0
    fi
    ip link set "$v" master $BRIDGE
    ip link set "$v" up
    has_addr "$ip" "$ns" || ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "$(dirname "$(hosts_file "$i")")"
    {
      echo "# written by scripts/netns.sh"
      echo "127.0.0.1 localhost"
      echo "$BRIDGE_IP recipe-gw"
      local j
      for j in $(seq 1 "$NODES"); do echo "$(node_ip "$j") $(ns_name "$j")"; done
    } >"$(hosts_file "$i")"
  done
  # every node reaches every other one and the bridge
  for i in $(seq 1 "$NODES"); do
    wait_reachable "$(ns_name "$i")" "$BRIDGE_IP"
    local j
    for j in $(seq 1 "$NODES"); do wait_reachable "$(ns_name "$i")" "$(node_ip "$j")"; done
  done
  say "up: $(for i in $(seq 1 "$NODES"); do printf '%s=%s ' "$(ns_name "$i")" "$(node_ip "$i")"; done)(bridge $BRIDGE $BRIDGE_IP)"
}

# wait_reachable NS IP: a TCP connect from namespace NS to IP:9 answers (refused counts:
# the address is there); no ping needed
wait_reachable() {
  local t
  for t in $(seq 1 50); do
    local out
    out=$(ip netns exec "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
    case "$out" in *refused*) return 0 ;; esac
    sleep 0.1
  done
  die "$2 is not reachable from namespace $1"
}

stop_ns_processes() {
  local ns=$1 pids sig t
  for sig in TERM KILL; do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    say "$ns: SIG$sig to what still runs there: $(echo $pids)"
    # shellcheck disable=SC2086
    kill -s $sig $pids 2>/dev/null || true
    for t in $(seq 1 50); do
      [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && return 0
      sleep 0.2
    done
  done
}

cmd_down() {
  need_rights
  local i ns v
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_name "$i"); v=$(veth "$i")
    if ns_exists "$ns"; then
      stop_ns_processes "$ns"
      ip netns del "$ns"
      say "namespace $ns removed"
    fi
    # (removing the namespace removes the pair, possibly a moment later)
    local t
    for t in $(seq 1 20); do
      link_exists "$v" || break
      ip link del "$v" 2>/dev/null || sleep 0.1
    done
    ! link_exists "$v" || die "cannot remove veth $v"
    rm -f "$(hosts_file "$i")"
    rmdir "$(dirname "$(hosts_file "$i")")" 2>/dev/null || true
  done
  rmdir /etc/netns 2>/dev/null || true
  if link_exists $BRIDGE; then ip link del $BRIDGE; say "bridge $BRIDGE removed"; fi
  say "down"
}

cmd_status() {
  local i ns rc=0
  if link_exists $BRIDGE; then echo "bridge $BRIDGE: up ($BRIDGE_IP)"; else echo "bridge $BRIDGE: absent"; rc=3; fi
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_name "$i")
    if ns_exists "$ns" && has_addr "$(node_ip "$i")" "$ns"; then
      echo "$ns: up ($(node_ip "$i")), processes: $(ip netns pids "$ns" | wc -l)"
    else
      echo "$ns: absent"; rc=3
    fi
  done
  return $rc
}

cmd_exec() {
  local n=${1:-}
  case "$n" in [1-9]) [ "$n" -le "$NODES" ] || { echo "[netns] no node $n (RECIPE_NETNS_NODES=$NODES)" >&2; exit 2; } ;;
    *) echo "usage: $0 exec NODE CMD..." >&2; exit 2 ;; esac
  shift
  [ $# -gt 0 ] || { echo "usage: $0 exec NODE CMD..." >&2; exit 2; }
  ns_exists "$(ns_name "$n")" || die "node $n is not up (scripts/netns.sh up)"
  # (not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup, which slurmd needs)
  exec nsenter --net="/run/netns/$(ns_name "$n")" unshare --mount --uts \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
    "$(ns_name "$n")" "$(hosts_file "$n")" "$@"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift; cmd_exec "$@" ;;
  nodes) for i in $(seq 1 "$NODES"); do echo "$(ns_name "$i") $(node_ip "$i")"; done ;;
  *) echo "usage: $0 up|down|status|nodes|exec NODE CMD..." >&2; exit 2 ;;
esac
