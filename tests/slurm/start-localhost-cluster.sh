#!/usr/bin/env bash
# start-localhost-cluster.sh - install, configure and start a one-node SLURM cluster on
# this machine (Debian 12 "bookworm", Slurm 22.05 from Debian's packages), for peftlab's
# tests and CI (.ci/run starts it, runs the tests, then stop-localhost-cluster.sh).
#
# Idempotent: packages are installed only if missing, config files are rewritten
# only if their content changes (running daemons are then restarted), and daemons
# that are already running (by their PID file) are left alone.
#
# Must run as root. No systemd needed: daemons are started directly and write
# PID files under $SLURM_LOCAL_DIR/run (munged: $SLURM_LOCAL_DIR/munge-run,
# mariadbd: $SLURM_LOCAL_DIR/mysql-run). stop-localhost-cluster.sh stops exactly
# those PIDs.
#
# Environment knobs:
#   SLURM_LOCAL_DIR   state/spool/log/pid dir        (default /tmp/slurm-local)
#   SLURM_PARTITION   name of the single partition    (default debug)
#   SLURM_AUTH        munge | none                     (default munge)
#   SLURM_WITH_DBD    0 | 1: also run slurmdbd + a private MariaDB so that
#                     `sacct` works                    (default 0)
#   SLURM_CLUSTER     ClusterName                      (default localci)
#   SLURM_FAKE_GPUS   N>0: GresTypes=gpu, node Gres=gpu:N, and /etc/slurm/gres.conf
#                     with fake devices (no real GPU needed)  (default 0: no GRES,
#                     and an existing /etc/slurm/gres.conf is removed)
#   SLURM_GRES_FILES  gres.conf File= for the fake GPUs, a Slurm range expression with
#                     N entries (e.g. /dev/null for N=1), or "none" for a Count-only
#                     line -- "none" does NOT work with Slurm 22.05: slurmd logs
#                     "Removing file-less GPU" and the node goes INVAL
#                     (default $SLURM_LOCAL_DIR/fakedev/nvidia[0-(N-1)], created with
#                     mknod as character devices 1,3 = same as /dev/null)
#   SLURM_KILLWAIT    KillWait seconds (SIGTERM -> SIGKILL at time limit) (default: unset = 30)
#   SLURM_EXTRA_CONF  extra slurm.conf lines appended verbatim at the end (default empty),
#                     e.g. a second partition and PreemptType/PreemptMode lines
#   SLURM_PART_OPTS   extra options for the default partition line, e.g.
#                     "PriorityTier=1 GraceTime=15" (default empty)
#   SLURM_PROCTRACK   cgroup | linuxproc (default cgroup: what real clusters use; a job's
#                     programs then get no SIGTERM at a time limit, only SIGKILL, so tests
#                     see what a cluster does). cgroup also writes
#                     /etc/slurm/cgroup.conf (removed again with linuxproc). With
#                     linuxproc, children of a batch script that has died escape
#                     the time-limit/cancel SIGKILL (they are re-parented to PID 1).
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
PART=${SLURM_PARTITION:-debug}
AUTH=${SLURM_AUTH:-munge}
WITH_DBD=${SLURM_WITH_DBD:-0}
CLUSTER=${SLURM_CLUSTER:-localci}
NGPU=${SLURM_FAKE_GPUS:-0}
KILLWAIT=${SLURM_KILLWAIT:-}
EXTRA_CONF=${SLURM_EXTRA_CONF:-}
PROCTRACK=${SLURM_PROCTRACK:-cgroup}
CGCONF=/etc/slurm/cgroup.conf
CONF=/etc/slurm/slurm.conf
GRESCONF=/etc/slurm/gres.conf
DBDCONF=/etc/slurm/slurmdbd.conf
MUNGE_SOCKET=/run/munge/munge.socket.2   # default path used by all munge clients
MYSQL_SOCKET=/run/mysqld/mysqld.sock
DB_PASS=slurmci

log() { printf '[slurm_localhost %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# alive NAME PIDFILE -> 0 if PIDFILE names a live process whose comm is NAME
alive() {
    local name=$1 f=$2 pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [ -d "/proc/$pid" ] || return 1
    [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$name" ]
}
# wait_until SECONDS CMD... -> poll CMD every 0.25 s
wait_until() {
    local t=$1; shift
    local n=$((t * 4))
    while [ $n -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; n=$((n - 1)); done
    return 1
}
# write_if_changed FILE MODE (content on stdin) -> returns 0 if the file changed
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
    install -m "$mode" "$tmp" "$f"; rm -f "$tmp"; return 0
}
T0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) - $T0" | bc; }

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing:$missing"
    # Keep the packages' init scripts from starting daemons during install
    # (there is no systemd here; we start everything ourselves below).
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
    fi
    # one apt at a time on a machine shared with other jobs
    flock /tmp/apt.lock apt-get update -qq
    DEBIAN_FRONTEND=noninteractive flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends $missing >/dev/null
    [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "packages installed after $(elapsed)s"
fi

# ---------------------------------------------------------------- 2. config
mkdir -p "$D"/{state,spool,log,run} /etc/slurm
HOST=$(hostname -s)
# slurmd -C prints the real hardware line, e.g.
# NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
HW=$(slurmd -C | head -1)
REALMEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$((REALMEM * 90 / 100))                     # a bit below the real value
NODE_LINE=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$MEM/" <<<"$HW")
if [ "$AUTH" = none ]; then AUTHTYPE=auth/none; CREDTYPE=cred/none
else AUTHTYPE=auth/munge; CREDTYPE=cred/munge; fi
if [ "$WITH_DBD" = 1 ]; then
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
    ACCT="AccountingStorageType=accounting_storage/none"
fi

GRES_LINES=""; NODE_GRES=""
conf_changed=0
if [ "$NGPU" -gt 0 ]; then
    GRES_LINES="GresTypes=gpu"
    NODE_GRES=" Gres=gpu:$NGPU"
    if [ -z "${SLURM_GRES_FILES:-}" ]; then
        mkdir -p "$D/fakedev"
        # slurmd rejects regular files ("is not a valid character or block device"),
        # so create character devices with /dev/null's numbers (1,3).
        for i in $(seq 0 $((NGPU - 1))); do
            f="$D/fakedev/nvidia$i"
            [ -c "$f" ] || { rm -f "$f"; mknod -m 666 "$f" c 1 3; }
        done
        if [ "$NGPU" = 1 ]; then GFILES="$D/fakedev/nvidia0"; else GFILES="$D/fakedev/nvidia[0-$((NGPU - 1))]"; fi
    else
        GFILES=$SLURM_GRES_FILES
    fi
    if [ "$GFILES" = none ]; then GLINE="NodeName=$HOST Name=gpu Count=$NGPU"
    else GLINE="NodeName=$HOST Name=gpu File=$GFILES"; fi
    write_if_changed "$GRESCONF" 644 <<EOF && conf_changed=1 || true
# Generated by start-localhost-cluster.sh: fake GPUs for CI (no real device behind them)
AutoDetect=off
$GLINE
EOF
elif [ -e "$GRESCONF" ]; then
    rm -f "$GRESCONF"; conf_changed=1
fi
if [ "$PROCTRACK" = cgroup ]; then
    write_if_changed "$CGCONF" 644 <<EOF && conf_changed=1 || true
# Generated by start-localhost-cluster.sh: cgroups only for process tracking (no constraints)
CgroupPlugin=autodetect
EOF
elif [ -e "$CGCONF" ]; then
    rm -f "$CGCONF"; conf_changed=1
fi
[ -n "$KILLWAIT" ] && GRES_LINES="$GRES_LINES
KillWait=$KILLWAIT"
write_if_changed "$CONF" 644 <<EOF && conf_changed=1 || true
# Generated by start-localhost-cluster.sh: one-node Slurm cluster on localhost for CI.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=$AUTHTYPE
CredType=$CREDTYPE
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# process tracking (linuxproc or cgroup, see SLURM_PROCTRACK); no task binding
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for 300 s; snakemake's slurm plugin needs
# MinJobAge >= 3 * slurm-init-seconds-before-status-checks to poll with squeue.
MinJobAge=300
MpiDefault=none
# jobs run at the nice value of the command that submitted them (a niced test run stays niced)
PropagatePrioProcess=1
$GRES_LINES
$NODE_LINE$NODE_GRES NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP${SLURM_PART_OPTS:+ $SLURM_PART_OPTS}
$EXTRA_CONF
EOF
[ $conf_changed = 1 ] && log "wrote $CONF (and gres.conf if any)" || log "$CONF unchanged"

# ---------------------------------------------------------------- 3. munge
if [ "$AUTH" = munge ]; then
    mkdir -p /run/munge "$D/munge-run" /var/log/munge /var/lib/munge
    chown munge:munge /run/munge "$D/munge-run" /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
    fi
    if alive munged "$D/munge-run/munged.pid"; then
        log "munged already running (pid $(cat "$D/munge-run/munged.pid"))"
    elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "a munged not started by this script is already serving $MUNGE_SOCKET; using it"
    else
        runuser -u munge -- /usr/sbin/munged --pid-file="$D/munge-run/munged.pid" \
            --log-file="$D/munge-run/munged.log" --socket="$MUNGE_SOCKET"
        wait_until 10 sh -c 'munge -n | unmunge' || die "munged did not come up"
        log "munged started (pid $(cat "$D/munge-run/munged.pid")) at $(elapsed)s"
    fi
fi

# ---------------------------------------------------------------- 4. optional slurmdbd + MariaDB
if [ "$WITH_DBD" = 1 ]; then
    mkdir -p "$D/mysql" "$D/mysql-run" /run/mysqld
    chown mysql:mysql "$D/mysql" "$D/mysql-run" /run/mysqld   # mariadbd must own its pid/log dir
    if [ ! -d "$D/mysql/mysql" ]; then
        mariadb-install-db --user=mysql --datadir="$D/mysql" --auth-root-authentication-method=socket \
            --skip-test-db > "$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
    fi
    if alive mariadbd "$D/mysql-run/mariadbd.pid"; then
        log "mariadbd already running (pid $(cat "$D/mysql-run/mariadbd.pid"))"
    else
        nohup /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$D/mysql" \
            --socket="$MYSQL_SOCKET" --pid-file="$D/mysql-run/mariadbd.pid" \
            --bind-address=127.0.0.1 --port=3306 --log-error="$D/mysql-run/mariadb.err" \
            --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
        wait_until 60 mariadb-admin --socket="$MYSQL_SOCKET" ping || die "mariadbd did not come up (see $D/mysql-run/mariadb.err)"
        log "mariadbd started (pid $(cat "$D/mysql-run/mariadbd.pid")) at $(elapsed)s"
    fi
    mariadb --socket="$MYSQL_SOCKET" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    dbd_changed=0
    write_if_changed "$DBDCONF" 600 <<EOF && dbd_changed=1 || true
AuthType=$AUTHTYPE
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    if alive slurmdbd "$D/run/slurmdbd.pid" && [ $dbd_changed = 1 ]; then
        log "slurmdbd.conf changed: restarting slurmdbd"
        kill "$(cat "$D/run/slurmdbd.pid")"; wait_until 20 sh -c "! kill -0 $(cat "$D/run/slurmdbd.pid") 2>/dev/null" || true
    fi
    if alive slurmdbd "$D/run/slurmdbd.pid"; then
        log "slurmdbd already running (pid $(cat "$D/run/slurmdbd.pid"))"
    else
        /usr/sbin/slurmdbd
        wait_until 15 alive slurmdbd "$D/run/slurmdbd.pid" || die "slurmdbd did not start (see $D/log/slurmdbd.log)"
        wait_until 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || die "slurmdbd did not listen on 6819 (see $D/log/slurmdbd.log)"
        log "slurmdbd started (pid $(cat "$D/run/slurmdbd.pid")) at $(elapsed)s"
    fi
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if [ $conf_changed = 1 ]; then
    for d in slurmd slurmctld; do
        if alive $d "$D/run/$d.pid"; then
            log "slurm.conf changed: restarting $d"
            pid=$(cat "$D/run/$d.pid"); kill "$pid"
            wait_until 30 sh -c "! kill -0 $pid 2>/dev/null" || die "$d (pid $pid) did not stop"
        fi
    done
fi
if alive slurmctld "$D/run/slurmctld.pid"; then
    log "slurmctld already running (pid $(cat "$D/run/slurmctld.pid"))"
else
    /usr/sbin/slurmctld            # daemonizes, writes SlurmctldPidFile
    wait_until 30 alive slurmctld "$D/run/slurmctld.pid" && wait_until 30 scontrol ping || die "slurmctld did not answer (see $D/log/slurmctld.log)"
    log "slurmctld started (pid $(cat "$D/run/slurmctld.pid")) at $(elapsed)s"
fi
if alive slurmd "$D/run/slurmd.pid"; then
    log "slurmd already running (pid $(cat "$D/run/slurmd.pid"))"
else
    /usr/sbin/slurmd               # daemonizes, writes SlurmdPidFile
    wait_until 15 alive slurmd "$D/run/slurmd.pid" || die "slurmd did not start (see $D/log/slurmd.log)"
    log "slurmd started (pid $(cat "$D/run/slurmd.pid")) at $(elapsed)s"
fi

# ---------------------------------------------------------------- 6. wait for the node
node_ok() { sinfo -h -n "$HOST" -o '%T' | grep -Eq '^(idle|mixed|allocated|completing)$'; }
if ! wait_until 60 node_ok; then
    log "node state: $(sinfo -h -n "$HOST" -o '%T %E')  - trying to resume it"
    scontrol update NodeName="$HOST" State=RESUME || true
    wait_until 30 node_ok || die "node $HOST not usable: $(sinfo -h -n "$HOST" -o '%T %E')"
fi
if [ "$WITH_DBD" = 1 ]; then
    # slurmctld registers the cluster in slurmdbd by itself; wait until sacct answers
    wait_until 30 sacct -n -X -S now-1hour || die "sacct does not work (see $D/log/slurmdbd.log)"
fi
log "cluster ready after $(elapsed)s"
sinfo
