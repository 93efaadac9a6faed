#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (controller + compute node), for trying and testing
# `agentnet -m hydra/launcher=slurm ...` without a cluster. With accounting (slurmdbd on MariaDB),
# because submitit reads job states from sacct.
#
#   sudo examples/slurm_local.sh start    # install slurm-wlm + munge if missing, configure, start, wait for idle
#   examples/slurm_local.sh status        # sinfo / squeue
#   sudo examples/slurm_local.sh stop     # cancel jobs, stop slurmd, slurmctld, munged
#
# Needs root and Debian/Ubuntu (apt-get). No systemd or containers needed: the daemons run directly.
# The node gets this machine's real core count and memory (minus 512 MiB for the system).
set -euo pipefail

STATE=/var/lib/agentnet-slurm
CONF_DIR=/etc/slurm
NODE=$(hostname -s)

die() { echo "slurm_local: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons); try: sudo $0 $1"; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null \
     && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and apt-get is not available: install SLURM and munge yourself"
  echo "slurm_local: installing slurm-wlm, slurmdbd, munge and mariadb-server (apt-get)..."
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null \
    || die "apt-get install slurm-wlm slurmdbd munge mariadb-server failed"
}

write_conf() {
  local cpus mem
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc honours OMP_NUM_THREADS, which a caller (pytest) may set
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 512 ))
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm /run/slurm
  cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by agentnet examples/slurm_local.sh: one node, this machine as controller and compute node.
ClusterName=agentnet
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Accounting through slurmdbd: sacct must work, since submitit reads job states (a cancelled job) from it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  # Debian's slurm.conf location differs between releases; point both at ours.
  if [ -d /etc/slurm-llnl ] && [ ! -e /etc/slurm-llnl/slurm.conf ]; then ln -sf "$CONF_DIR/slurm.conf" /etc/slurm-llnl/slurm.conf; fi
}

start_accounting() {
  # MariaDB (no systemd here: the server runs directly) and slurmdbd on top of it.
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  if ! mysqladmin ping --silent >/dev/null 2>&1; then
    (mysqld_safe --skip-syslog >/dev/null 2>&1 &)
    for _ in $(seq 30); do mysqladmin ping --silent >/dev/null 2>&1 && break; sleep 1; done
    mysqladmin ping --silent >/dev/null 2>&1 || die "MariaDB did not start (see /var/log/mysql/)"
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'agentnet-local';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || die "could not create the accounting database"
  cat > "$CONF_DIR/slurmdbd.conf" <<CONF
# Written by agentnet examples/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=agentnet-local
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
CONF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  pgrep -x slurmdbd >/dev/null || slurmdbd || die "slurmdbd failed to start (see /var/log/slurm/slurmdbd.log)"
  for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
  sacctmgr -i -n list cluster format=cluster 2>/dev/null | grep -qw agentnet || sacctmgr -i add cluster agentnet >/dev/null \
    || die "could not register the cluster with slurmdbd"
}

start_munge() {
  pgrep -x munged >/dev/null && return
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged
  else munged --force; fi
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

wait_idle() {
  for _ in $(seq 60); do
    local state
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) echo "slurm_local: node $NODE is $state"; return ;;
      down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "node $NODE did not become idle in 60 s; see /var/log/slurm/slurmctld.log and slurmd.log"
}

start() {
  need_root start
  install
  write_conf
  start_munge
  start_accounting
  pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld failed to start (see /var/log/slurm/slurmctld.log)"
  pgrep -x slurmd >/dev/null || slurmd || die "slurmd failed to start (see /var/log/slurm/slurmd.log)"
  wait_idle
}

stop() {
  need_root stop
  scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmdbd 2>/dev/null || true
  mysqladmin shutdown 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x slurmdbd >/dev/null || pgrep -x munged >/dev/null || pgrep -x mariadbd >/dev/null || { echo "slurm_local: stopped"; return; }; sleep 0.5; done
  die "daemons still running after 10 s"
}

status() {
  command -v sinfo >/dev/null || die "SLURM is not installed; run: sudo $0 start"
  sinfo && squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
