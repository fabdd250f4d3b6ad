#!/usr/bin/env bash
# Start a private single-node SLURM cluster on this machine, for the tests and for trying the
# `hydra/launcher=submitit_slurm` path without a real cluster.
#
#   scripts/slurm/start.sh [DIR]        # DIR defaults to $INSTRUCTBLIP_SLURM_DIR or /tmp/instructblip-slurm
#   source DIR/env.sh                   # SLURM_CONF for sinfo/sbatch/sacct/submitit
#   scripts/slurm/stop.sh [DIR] [--purge]
#
# Daemons: munged (auth), mariadbd + slurmdbd (accounting, so that `sacct` answers and submitit can tell
# a cancelled job from a running one), slurmctld and slurmd. Everything they read or write, sockets and
# pid files included, lives under DIR; nothing in /etc is touched, no systemd is needed. Needs root
# (slurmd starts jobs) and the Debian packages from scripts/slurm/install_packages.sh.
#
# Ports: INSTRUCTBLIP_SLURM_PORT (default 6817) for slurmctld, +1 slurmd, +2 slurmdbd, +3 mariadbd.
# Each start is a fresh cluster: job ids begin again at 1, so give every sweep a fresh hydra.sweep.dir
# (submitit would otherwise find an old `<id>_result.pkl` and return it as the new job's result).
set -euo pipefail

DIR=$(realpath -m "${1:-${INSTRUCTBLIP_SLURM_DIR:-/tmp/instructblip-slurm}}")
PORT=${INSTRUCTBLIP_SLURM_PORT:-6817}
CLUSTER=${INSTRUCTBLIP_SLURM_CLUSTER:-instructblip}

die() { echo "slurm start: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (slurmd launches the jobs)"
for tool in munged mungekey munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd \
            sinfo sacctmgr; do
  command -v "$tool" >/dev/null || die "'$tool' not found; install the packages: scripts/slurm/install_packages.sh"
done

# A daemon counts as running when its pid is alive and not a zombie (orphans are reaped late here).
running() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$state" ] && [ "${state:0:1}" != Z ]; }
for pidfile in "$DIR"/run/*.pid; do
  if [ -f "$pidfile" ] && running "$(cat "$pidfile")"; then
    die "a cluster is already running in $DIR ($(basename "$pidfile" .pid)); stop it with scripts/slurm/stop.sh $DIR"
  fi
done

# poll CMD every 0.2 s for at most SECONDS
poll() { local tries=$(( $1 * 5 )); shift; while ! "$@" >/dev/null 2>&1; do
  tries=$((tries - 1)); [ "$tries" -gt 0 ] || return 1; sleep 0.2; done; }
fail_with_logs() { echo "slurm start: $*" >&2; tail -n 20 "$DIR"/log/*.log >&2 2>/dev/null || true; exit 1; }

rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/mysql" "$DIR/jobs"
mkdir -p "$DIR"/{etc,munge,state,spool,log,run,mysql,jobs}
chmod 755 "$DIR/munge"   # clients other than root must reach the socket; munged complains otherwise

# ---- munge: own key, own socket ------------------------------------------------------------------
SOCKET="$DIR/munge/munge.socket.2"
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/run/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
poll 10 sh -c "munge -n -S '$SOCKET' | unmunge -S '$SOCKET'" || fail_with_logs "munged does not answer on $SOCKET"

# ---- MariaDB for slurmdbd: private datadir, TCP on localhost only ---------------------------------
DB_PORT=$((PORT + 3))
mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" --skip-test-db \
  --auth-root-authentication-method=normal >"$DIR/log/mariadb-install.log" 2>&1 \
  || fail_with_logs "mariadb-install-db failed"
# mariadbd stays in the foreground: detach it from our stdio so that callers reading our output see EOF.
setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysqld.sock" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" \
  --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
  </dev/null >/dev/null 2>&1 &
echo $! >"$DIR/run/mariadbd.pid"
poll 30 mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot -e 'SELECT 1' \
  || fail_with_logs "mariadbd did not start"

DBD_PORT=$((PORT + 2))
cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"   # slurmdbd refuses a config others can read (it may hold a password)

# ---- slurm.conf -----------------------------------------------------------------------------------
HOST=$(hostname -s)
# Describe the node exactly as slurmd sees it, or slurmd logs a topology mismatch and may drain it.
TOPOLOGY=$(SLURM_CONF=/dev/null slurmd -C 2>/dev/null | head -n 1 | tr ' ' '\n' \
           | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
[ -n "$TOPOLOGY" ] || TOPOLOGY="CPUs=$(nproc)"
# Declaring more memory than the machine has drains the node ("Low RealMemory"): leave 10 % aside.
MEMORY_MB=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
: >"$DIR/etc/plugstack.conf"   # an empty SPANK stack instead of the system's /etc/slurm/plugstack.conf

cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may only start again once its launch credential expired: 10 s instead of 120 s.
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/etc/plugstack.conf
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# slurmctld's connection to slurmdbd does not use AuthInfo's socket; without this it looks in /run/munge.
AccountingStoragePass=$SOCKET
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule on submit and every second (the defaults wait 3 s, then 30-60 s between passes).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
ReturnToService=2
MessageTimeout=10
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST $TOPOLOGY RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/etc/slurm.conf"

# ---- daemons (each one detaches and writes its pid file) ------------------------------------------
slurmdbd
poll 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT" || fail_with_logs "slurmdbd does not listen on $DBD_PORT"
slurmctld -i
slurmd
node_idle() { [ "$(sinfo --noheader --Node --format=%t | head -n 1)" = idle ]; }
poll 30 node_idle || fail_with_logs "node $HOST never became idle: $(sinfo --Node --long 2>&1 | tail -n 1)"
# slurmctld registers the cluster in slurmdbd by itself; sacct has nothing to ask before that.
cluster_known() { sacctmgr --noheader --parsable2 list cluster format=cluster | grep -qx "$CLUSTER"; }
poll 30 cluster_known || fail_with_logs "slurmctld did not register cluster $CLUSTER with slurmdbd"

cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$SLURM_CONF
EOF
echo "slurm cluster '$CLUSTER' up in $DIR (slurmctld port $PORT, partition debug, node $HOST: $TOPOLOGY)"
echo "export SLURM_CONF=$SLURM_CONF"
