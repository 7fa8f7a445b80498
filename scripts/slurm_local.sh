#!/usr/bin/env bash
# A real single-node Slurm on localhost for tests and CI (tests/slurm), from Debian's packages.
#
#   scripts/slurm_local.sh start    # install missing packages, write configs, start the daemons, wait until usable
#   scripts/slurm_local.sh status   # which daemons run, sinfo, squeue
#   eval "$(scripts/slurm_local.sh env)"   # SLURM_CONF for sbatch / sinfo / sacct / the submitit launcher
#   scripts/slurm_local.sh stop     # cancel remaining jobs, stop the daemons this script started
#
# Two nodes (RECIPE_SLURM_NETNS=1): nodes recipe-n1 and recipe-n2, one slurmd in each of
# the network namespaces of scripts/netns.sh (brought up by `start` when missing), each with
# its own NodeName, address (10.213.0.11, .12), hostname, spool dir and log
# (slurmd-recipe-nN.log); slurmctld, slurmdbd and MariaDB stay in the root namespace and the
# nodes reach slurmctld on the bridge (10.213.0.1). Each node gets the machine's CPUs and half
# its memory. SlurmdTimeout is 120 s (Slurm's default: 300 s). `stop` leaves the namespaces
# up (scripts/netns.sh down removes them).
#
# Daemons: munged (private socket and key), MariaDB (127.0.0.1 only, data in the state dir),
# slurmdbd (accounting, so that `sacct` works: without it submitit waits forever on a job
# killed before writing its result), slurmctld and one slurmd, node `localhost`
# (127.0.0.1), partition `debug`, cluster `recipe`. Everything (configs, state, logs, PIDs)
# lives in the state dir; a cold start (no daemon of ours running) wipes it, so job ids
# and the accounting database start fresh together. Needs root (apt-get, the munge user,
# SlurmUser=root). Package installs are non-interactive with --no-install-recommends; a
# temporary policy-rc.d keeps apt from starting the system's own services.
#
# Exit status: 0 ok, 1 a daemon or config failed, 2 usage, 3 cannot run here (not root,
# or packages missing and apt-get absent or failing): tests/slurm skips on 3.
#
# Environment:
#   RECIPE_SLURM_DIR      state dir (default /tmp/recipe-slurm)
#   RECIPE_SLURM_PORTS    first of four TCP ports: slurmctld, slurmd, slurmdbd, MariaDB (default 6817)
#   RECIPE_SLURM_TIMEOUT  seconds to wait for each daemon (default 60)
#   RECIPE_SLURM_MEM_MARGIN_MB  memory kept back from the node's RealMemory (default 1024)
#   RECIPE_SLURM_NETNS    1: two nodes in network namespaces (above); the mode a cold start
#                         chose is kept in the state dir and used by status/stop
set -euo pipefail

STATE="${RECIPE_SLURM_DIR:-/tmp/recipe-slurm}"
PORT0="${RECIPE_SLURM_PORTS:-6817}"
TIMEOUT="${RECIPE_SLURM_TIMEOUT:-60}"
MEM_MARGIN_MB="${RECIPE_SLURM_MEM_MARGIN_MB:-1024}"
CTLD_PORT=$PORT0
SLURMD_PORT=$((PORT0 + 1))
DBD_PORT=$((PORT0 + 2))
DB_PORT=$((PORT0 + 3))
CLUSTER=recipe
ACCOUNT=recipe
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd slurm-wlm-mysql-plugin mariadb-server mariadb-client)
NETNS_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/netns.sh"
NETNS_NODES=(recipe-n1 recipe-n2)    # names and addresses of scripts/netns.sh
NETNS_ADDRS=(10.213.0.11 10.213.0.12)
NETNS_GW=10.213.0.1
# set_mode local|netns: the slurmd daemons of the mode
set_mode() {
  MODE=$1
  if [ "$MODE" = netns ]; then SLURMDS=(slurmd-recipe-n1 slurmd-recipe-n2); else SLURMDS=(slurmd); fi
  DAEMONS=(munged mariadb slurmdbd slurmctld "${SLURMDS[@]}")   # start order; stopped in reverse
}
env_mode() { case "${RECIPE_SLURM_NETNS:-0}" in 1) echo netns ;; 0|"") echo local ;;
  *) echo "[slurm_local] RECIPE_SLURM_NETNS=$RECIPE_SLURM_NETNS: expected 0 or 1" >&2; exit 2 ;; esac; }
# the mode of the cluster in the state dir (written at its cold start) wins over the variable
if [ -f "$STATE/etc/mode" ]; then set_mode "$(cat "$STATE/etc/mode")"; else set_mode "$(env_mode)"; fi

export SLURM_CONF="$STATE/etc/slurm.conf"
export PATH="/usr/sbin:/sbin:$PATH"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
T0=$(now_ms)
# seconds since the time $1 (from now_ms), one decimal
elapsed() { local d=$(( $(now_ms) - $1 )); printf '%d.%d' $((d / 1000)) $(((d % 1000) / 100)); }
say() { printf '[slurm_local %5ss] %s\n' "$(elapsed "$T0")" "$*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }
# the machine cannot run a local Slurm (not a failure of Slurm itself): exit 3
unavailable() { echo "[slurm_local] unavailable: $*" >&2; exit 3; }

pidfile() { echo "$STATE/run/$1.pid"; }
# the executable each daemon runs as (to tell our PID from a reused one)
binary() { case $1 in mariadb) echo mariadbd ;; slurmd-*) echo slurmd ;; *) echo "$1" ;; esac; }
# is process $1 alive (a zombie counts as dead: PID 1 in a container may never reap it)
is_live() { kill -0 "$1" 2>/dev/null && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
# PID of daemon $1 if this script started it and it still runs the daemon's executable
# (not a reused PID); with "launching" as $2, also while it is still being exec'd
alive_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  is_live "$pid" || return 1
  if [ "${2:-}" != launching ]; then
    # (Debian's slurmctld is slurmctld-wlm behind an alternative)
    case "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" in "$(binary "$1")"*) ;; *) return 1 ;; esac
  fi
  echo "$pid"
}

log_tail() { [ -f "$STATE/log/$1.log" ] && tail -n 20 "$STATE/log/$1.log" | sed "s/^/    $1.log: /" >&2 || true; }

# wait_for NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds, die after TIMEOUT
wait_for() {
  local name=$1 what=$2; shift 2
  local end=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if ! alive_pid "$name" launching >/dev/null; then
      log_tail "$name"
      die "$name exited before $what (log: $STATE/log/$name.log)"
    fi
    if [ "$(date +%s)" -ge "$end" ]; then
      log_tail "$name"
      die "timed out after ${TIMEOUT}s waiting for $what (log: $STATE/log/$name.log)"
    fi
    sleep 0.2
  done
}

# launch NAME BINARY ARGS...: start a foreground daemon detached, record its PID
launch() {
  local name=$1; shift
  command -v "$(binary "$name")" >/dev/null || die "$(binary "$name") not found (packages: ${PACKAGES[*]})"
  # (fd 9, the state-dir lock, closed: a daemon holding it would block every later start/stop)
  setsid "$@" </dev/null >>"$STATE/log/$name.log" 2>&1 9>&- &
  echo $! >"$(pidfile "$name")"
}

need_root() {
  [ "$(id -u)" = 0 ] || unavailable "needs root (apt-get, the munge user, SlurmUser=root); run it as root or with sudo"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || unavailable "packages ${missing[*]} are missing and there is no apt-get to install them"
  local t; t=$(now_ms)
  say "installing ${missing[*]} (apt-get, --no-install-recommends)"
  # keep apt from starting the system's own munge/mariadb/slurm services (no systemd here)
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && created=1
  fi
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  local opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  if ! apt-get install "${opts[@]}" "${missing[@]}" >"/tmp/slurm_local_apt.log" 2>&1; then
    say "apt-get install failed; running apt-get update and retrying"
    { apt-get update -q && apt-get install "${opts[@]}" "${missing[@]}"; } >>"/tmp/slurm_local_apt.log" 2>&1 || rc=$?
  fi
  [ $created = 1 ] && rm -f $policy
  if [ $rc != 0 ]; then
    tail -n 20 /tmp/slurm_local_apt.log >&2
    unavailable "apt-get install ${missing[*]} failed (log: /tmp/slurm_local_apt.log)"
  fi
  say "packages installed in $(elapsed "$t") s"
}

any_running() { local d; for d in "${DAEMONS[@]}"; do alive_pid "$d" >/dev/null && return 0; done; return 1; }

write_configs() {
  # wipe only a state dir this script made (or an empty one)
  if [ -d "$STATE" ] && [ -n "$(ls -A "$STATE")" ] \
     && ! grep -qs "written by scripts/slurm_local.sh" "$STATE/etc/slurm.conf"; then
    die "$STATE is not empty and not a state dir of this script: refusing to wipe it (set RECIPE_SLURM_DIR)"
  fi
  rm -rf "$STATE"
  mkdir -p "$STATE"/{etc,run,log,ctld,spool,munge,munge-socket}
  # node size from the hardware, minus a memory margin
  local hw cpus mem
  hw=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot parse 'slurmd -C' output: $hw"
  mem=$((mem - MEM_MARGIN_MB))
  [ "$mem" -gt 0 ] || die "node memory $((mem + MEM_MARGIN_MB)) MB is below RECIPE_SLURM_MEM_MARGIN_MB=$MEM_MARGIN_MB"
  local topo
  topo=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)

  # munge: private key and socket; munged runs as the munge user the package created
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  # (the key's dir private, the socket's dir open to all, as munged requires)
  chown -R munge:munge "$STATE/munge" "$STATE/munge-socket"
  chmod 700 "$STATE/munge"
  chmod 755 "$STATE/munge-socket"
  chmod 400 "$STATE/munge/munge.key"
  local auth="AuthInfo=socket=$STATE/munge-socket/munge.socket"

  local ctld_addr=127.0.0.1 nodes_conf spool=$STATE/spool slurmd_pid=$STATE/run/slurmd.daemon.pid
  local slurmd_log=$STATE/log/slurmd.log extra=""
  if [ "$MODE" = netns ]; then
    # two nodes sharing the machine: each gets its CPUs and half the memory; per-node spool,
    # PID file and log (%n: the node's name); a killed node is noticed within ~20 s
    ctld_addr=$NETNS_GW
    mem=$((mem / 2))
    spool="$STATE/spool/%n"; slurmd_pid="$STATE/run/slurmd-%n.daemon.pid"; slurmd_log="$STATE/log/slurmd-%n.log"
    mkdir -p "$STATE/spool/${NETNS_NODES[0]}" "$STATE/spool/${NETNS_NODES[1]}"
    nodes_conf="NodeName=${NETNS_NODES[0]} NodeAddr=${NETNS_ADDRS[0]} CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
NodeName=${NETNS_NODES[1]} NodeAddr=${NETNS_ADDRS[1]} CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=${NETNS_NODES[0]},${NETNS_NODES[1]} Default=YES MaxTime=INFINITE State=UP"
    # a dead node is marked down after SlurmdTimeout; Slurm's default is 300 s. Kept above the
    # time Ray needs to notice a lost node (~35 s measured) so that, as on a real cluster, the
    # head's trainer fails first and the launcher gets its error; with 20 s Slurm cancelled
    # and requeued the job first (NODE_FAIL), and the launcher waited for the rerun
    extra="SlurmdTimeout=120
MessageTimeout=5"
  else
    nodes_conf="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
  fi
  echo "$MODE" >"$STATE/etc/mode"

  cat >"$SLURM_CONF" <<EOF
# written by scripts/slurm_local.sh: $MODE Slurm for tests
ClusterName=$CLUSTER
SlurmctldHost=localhost($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
$auth
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$STATE/run/slurmctld.daemon.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$slurmd_log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket for connections to slurmdbd (Slurm reads it from here, not from AuthInfo)
AccountingStoragePass=$STATE/munge-socket/munge.socket
JobCompType=jobcomp/none
KillWait=5
$extra
$nodes_conf
EOF

  cat >"$STATE/etc/slurmdbd.conf" <<EOF
# written by scripts/slurm_local.sh
AuthType=auth/munge
$auth
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.daemon.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf"
  say "configs written to $STATE/etc (node: CPUs=$cpus RealMemory=${mem}MB)"
}

mysql_cli() { mariadb --no-defaults --socket="$STATE/mysql.sock" -u root "$@"; }

start_daemons() {
  local t
  if ! alive_pid munged >/dev/null; then
    t=$(now_ms)
    launch munged setpriv --reuid=munge --regid=munge --clear-groups munged --foreground \
      --key-file="$STATE/munge/munge.key" --socket="$STATE/munge-socket/munge.socket" \
      --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munge.seed" --log-file=/dev/stderr
    wait_for munged "munged's socket" munge -S "$STATE/munge-socket/munge.socket" -n
    say "munged up ($(elapsed "$t") s)"
  fi
  if ! alive_pid mariadb >/dev/null; then
    t=$(now_ms)
    if [ ! -d "$STATE/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
        --auth-root-authentication-method=normal --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || { tail -n 20 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed (log: $STATE/log/mariadb-install.log)"; }
    fi
    launch mariadb mariadbd --no-defaults --datadir="$STATE/mysql" --user=root \
      --socket="$STATE/mysql.sock" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
      --pid-file="$STATE/run/mariadb.daemon.pid" --innodb-buffer-pool-size=64M
    wait_for mariadb "MariaDB on $STATE/mysql.sock" mysql_cli -e "select 1"
    mysql_cli -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    say "mariadb up on 127.0.0.1:$DB_PORT ($(elapsed "$t") s)"
  fi
  if ! alive_pid slurmdbd >/dev/null; then
    t=$(now_ms)
    launch slurmdbd slurmdbd -D
    wait_for slurmdbd "slurmdbd on port $DBD_PORT" sacctmgr -n list cluster
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" \
      || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
    sacctmgr -n list account format=account | grep -qw "$ACCOUNT" \
      || sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" description=tests organization=recipe >/dev/null
    sacctmgr -n list user format=user | grep -qw root \
      || sacctmgr -i -Q add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    say "slurmdbd up, cluster '$CLUSTER' and account '$ACCOUNT' registered ($(elapsed "$t") s)"
  fi
  if ! alive_pid slurmctld >/dev/null; then
    t=$(now_ms)
    launch slurmctld slurmctld -D -i
    wait_for slurmctld "slurmctld on port $CTLD_PORT" scontrol ping
    say "slurmctld up ($(elapsed "$t") s)"
  fi
  node_idle() { local st; st=$(sinfo -h -n "$1" -o %t); [ "$st" = idle ]; }
  if [ "$MODE" = netns ]; then
    local i d node
    for i in 0 1; do
      d=${SLURMDS[$i]}; node=${NETNS_NODES[$i]}
      alive_pid "$d" >/dev/null && continue
      t=$(now_ms)
      # in the node's namespace, with its hostname (scripts/netns.sh exec N)
      launch "$d" bash "$NETNS_SCRIPT" exec $((i + 1)) slurmd -D -N "$node"
      wait_for "$d" "node '$node' idle in sinfo" node_idle "$node"
      say "$d up in namespace $node (${NETNS_ADDRS[$i]}), node idle ($(elapsed "$t") s)"
    done
  elif ! alive_pid slurmd >/dev/null; then
    t=$(now_ms)
    launch slurmd slurmd -D -N localhost
    wait_for slurmd "node 'localhost' idle in sinfo" node_idle localhost
    say "slurmd up, node idle ($(elapsed "$t") s)"
  fi
  wait_for slurmdbd "sacct" sacct -n -X -S now
}

cmd_start() {
  need_root
  install_packages
  exec 9>"${STATE%/}.lock"
  flock 9
  if any_running; then
    say "already running in $STATE ($MODE); starting whatever is missing"
  else
    set_mode "$(env_mode)"
    write_configs
  fi
  if [ "$MODE" = netns ]; then
    bash "$NETNS_SCRIPT" status >/dev/null 2>&1 || {
      local rc=0; bash "$NETNS_SCRIPT" up || rc=$?
      [ $rc = 3 ] && unavailable "two-node mode needs the network namespaces of scripts/netns.sh (see above)"
      [ $rc = 0 ] || die "scripts/netns.sh up failed"
    }
  fi
  start_daemons
  say "Slurm ready in $(elapsed "$T0") s: $(sinfo -h -o '%P %D %t %c CPUs %m MB') (SLURM_CONF=$SLURM_CONF)"
}

cmd_stop() {
  exec 9>"${STATE%/}.lock"
  flock 9
  if alive_pid slurmctld >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || say "warning: squeue failed (munged down?): cannot cancel jobs"
    if [ -n "${jobs// }" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs || true
      local end=$(( $(date +%s) + TIMEOUT ))
      while [ -n "$(squeue -h -o %i 2>/dev/null || true)" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.5; done
      [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] || say "warning: jobs still listed after ${TIMEOUT}s: $(squeue -h -o %i | tr '\n' ' ')"
    fi
  fi
  local i d pid stopped=()
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[$i]}
    pid=$(alive_pid "$d") || continue
    kill -TERM "$pid" 2>/dev/null || true
    local end=$(( $(date +%s) + 20 ))
    while is_live "$pid" && [ "$(date +%s)" -lt "$end" ]; do sleep 0.1; done
    if is_live "$pid"; then
      say "warning: $d (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$d")"
    stopped+=("$d")
  done
  if [ ${#stopped[@]} -eq 0 ]; then
    say "nothing of ours running in $STATE"
  else
    say "stopped ${stopped[*]} in $(elapsed "$T0") s"
  fi
}

cmd_status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(alive_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=3; fi
  done
  if alive_pid slurmctld >/dev/null; then
    sinfo || true
    squeue || true
  fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state dir: \$RECIPE_SLURM_DIR, default /tmp/recipe-slurm)" >&2; exit 2 ;;
esac
