#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the SLURM tests (make test-slurm).
#
#   scripts/slurm_local.sh start    install Debian's packages if missing, start munged, MariaDB,
#                                   slurmdbd, slurmctld and slurmd; wait until a job runs
#   scripts/slurm_local.sh stop     stop exactly the daemons `start` recorded
#   scripts/slurm_local.sh env      print the export line clients need (SLURM_CONF)
#
# Needs root (as CI runs) and Debian's package registry. Everything lives in $SLURM_LOCAL_DIR
# (default /tmp/magic-slurm): configs, state, logs, the MariaDB data and the daemons' pids.
# No systemd and no cgroups are needed: every daemon runs in the foreground, detached, and its
# pid is recorded; accounting (slurmdbd + MariaDB, socket only) is what makes `sacct`, and so
# submitit, see cancelled and killed jobs as finished.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/magic-slurm}
CONF=$DIR/etc/slurm.conf
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
SOCKET=/run/mysqld/mysqld.sock  # where slurmdbd's MySQL client looks for StorageHost=localhost

log() { echo "slurm_local: $*" >&2; }

install_packages() {
  local missing=0
  for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mungekey; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing=1
  done
  [ "$missing" = 0 ] && return
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $PACKAGES >"$DIR/apt.log" 2>&1 || {
    apt-get update -q >>"$DIR/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends $PACKAGES >>"$DIR/apt.log" 2>&1
  } || { log "apt-get failed; see $DIR/apt.log"; exit 1; }
}

# start NAME COMMAND...: run a daemon in the foreground, detached, and record its pid
start_daemon() {
  local name=$1; shift
  setsid "$@" >"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! >"$DIR/pids/$name"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what (logs in $DIR/log)"; exit 1; fi
    sleep 0.2
  done
}

write_configs() {
  local host node
  host=$(hostname -s)
  # The node line as slurmd sees this machine, reachable on loopback; a little memory left to the OS.
  node=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host NodeAddr=127.0.0.1/; s/ UpTime=.*//")
  mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$node")
  node=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/" <<<"$node")
  cat >"$CONF" <<EOF
ClusterName=magic
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
KillWait=2
MinJobAge=600
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/state/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start() {
  if [ -d "$DIR/pids" ] && ls "$DIR/pids"/* >/dev/null 2>&1; then
    log "already started (pids in $DIR/pids); run stop first"; exit 1
  fi
  [ "$(id -u)" = 0 ] || { log "needs root (installs packages, runs munged as munge)"; exit 1; }
  mkdir -p "$DIR"/{etc,log,pids,state/ctld,state/d,mysql}
  install_packages
  export SLURM_CONF=$CONF
  write_configs

  # munge: its own key, /run/munge owned by munge, the daemon run as munge
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
  start_daemon munged runuser -u munge -- /usr/sbin/munged -F --force
  wait_for 10 munged munge -n

  # MariaDB in $DIR/mysql, socket only, and the accounting database's user
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
      >"$DIR/log/mariadb-install.out" 2>&1
  fi
  mkdir -p "$(dirname $SOCKET)"
  start_daemon mariadbd /usr/sbin/mariadbd --user=root --datadir="$DIR/mysql" --socket=$SOCKET \
    --skip-networking --pid-file="$DIR/state/mariadb.pid" --log-error="$DIR/log/mariadb.log"
  wait_for 30 MariaDB mariadb --socket=$SOCKET -e "select 1"
  mariadb --socket=$SOCKET -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

  start_daemon slurmdbd /usr/sbin/slurmdbd -D
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster magic >/dev/null 2>&1 || true
  start_daemon slurmctld /usr/sbin/slurmctld -D -i
  wait_for 30 slurmctld scontrol ping
  start_daemon slurmd /usr/sbin/slurmd -D
  wait_for 30 "the node" bash -c "sinfo -h -o %T | grep -q -E '^(idle|mixed|allocated)'"
  wait_for 30 "a first job" srun -t 1 true
  log "up: export SLURM_CONF=$CONF"
}

stop() {
  [ -d "$DIR/pids" ] || { log "not started"; return 0; }
  for name in slurmd slurmctld slurmdbd mariadbd munged; do  # the reverse order of start
    local file=$DIR/pids/$name
    [ -f "$file" ] || continue
    local pid; pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$file"
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
