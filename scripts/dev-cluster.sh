#!/usr/bin/env bash
# dev-cluster.sh up|down|status|env - a real single-node SLURM cluster (with
# slurmdbd accounting on a private MariaDB) on this machine, for tests and CI.
#
# Built for Debian 12 (slurm-wlm 22.05), running as root, without systemd or
# cgroups. Everything the cluster writes lives in one state folder,
# $POLAR_CLUSTER_DIR (default /var/lib/polar-dev-cluster):
#   etc/slurm.conf, etc/slurmdbd.conf (600, SlurmUser), etc/my.cnf
#   state/ (StateSaveLocation: kept, so job ids never repeat), spool/, mysql/,
#   log/ (one log per daemon), run/ (pid files, MariaDB socket)
# /etc/slurm/slurm.conf is a symlink to etc/slurm.conf (unless some other
# slurm.conf is already there), so clients work even without SLURM_CONF.
# munged uses Debian's default key and socket (/etc/munge, /run/munge).
#
#   up      install missing packages, write config, start munged, mariadb,
#           slurmdbd, slurmctld, slurmd; wait until the node is usable and
#           sacct answers; print `export SLURM_CONF=...`. Idempotent.
#   down    cancel all jobs (POLAR_CLUSTER_KEEP_JOBS=1: keep them), stop the
#           daemons (and mariadb) cleanly; keep the state folder.
#   status  say which daemons run, show sinfo; exit 0 only if usable.
#   env     print `export SLURM_CONF=...` only.
#
# Knobs (environment): POLAR_CLUSTER_DIR, POLAR_CLUSTER_NAME (polar),
# POLAR_CLUSTER_CPUS (default nproc; more than nproc oversubscribes the node),
# POLAR_CLUSTER_MEM_MB (default: MemTotal minus a margin),
# POLAR_CLUSTER_DB_PORT (16819, MariaDB on 127.0.0.1 only),
# POLAR_CLUSTER_LINK_ETC (1: manage the /etc/slurm/slurm.conf symlink),
# POLAR_CLUSTER_TIMEOUT (60: seconds to wait for each daemon).
set -euo pipefail

DIR=${POLAR_CLUSTER_DIR:-/var/lib/polar-dev-cluster}
CLUSTER=${POLAR_CLUSTER_NAME:-polar}
DB_PORT=${POLAR_CLUSTER_DB_PORT:-16819}
LINK_ETC=${POLAR_CLUSTER_LINK_ETC:-1}
WAIT_S=${POLAR_CLUSTER_TIMEOUT:-60}
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
NODE=$(hostname -s)
T0=${EPOCHREALTIME/./}

say() {
    local us=$((${EPOCHREALTIME/./} - T0))
    printf '[dev-cluster %3d.%01ds] %s\n' $((us / 1000000)) $((us / 100000 % 10)) "$*" >&2
}
die() { say "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes
pid_file() {
    case $1 in
        munged) echo /run/munge/munged.pid ;;
        mariadbd) echo "$RUN/mysql/mariadbd.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}
# gone PID: the process has exited, or is a zombie that pid 1 has not reaped
# yet (here that can take seconds). A multi-threaded daemon whose main thread
# exited first is a zombie with threads left: not gone yet.
gone() {
    local st
    st=$(awk '/^State:/ {s = $2} /^Threads:/ {t = $2} END {print s t}' "/proc/$1/status" 2>/dev/null) || return 0
    [[ -z $st || $st == Z1 || $st == X* ]]
}
# pid_of NAME: prints the pid of our running daemon NAME, or fails.
pid_of() {
    local f pid
    f=$(pid_file "$1")
    [[ -r $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    ! gone "$pid" || return 1
    # the pid file may be stale and the pid reused by something else
    [[ $(cat "/proc/$pid/comm") == "$1" ]] || return 1
    echo "$pid"
}
running() { pid_of "$1" >/dev/null; }

# wait_for SECONDS WHAT CMD...: retry CMD until it succeeds.
wait_for() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || return 1
        sleep 0.2
    done
    say "$what ready"
}

stop_daemon() {
    local name=$1 pid i
    pid=$(pid_of "$name") || { say "$name not running"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        gone "$pid" && { say "$name stopped"; return 0; }
        sleep 0.1
    done
    say "$name did not stop in 30 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- packages
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

install_packages() {
    local missing=() p added_policy=""
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}); run as root to install them"
    say "installing ${missing[*]} (20 s to a minute)"
    # keep the packages' init scripts from starting daemons with Debian's config
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOG/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >>"$LOG/apt.log" 2>&1 || {
        [[ -z $added_policy ]] || rm -f /usr/sbin/policy-rc.d
        tail -20 "$LOG/apt.log" >&2
        die "apt-get install failed (log: $LOG/apt.log)"
    }
    [[ -z $added_policy ]] || { rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
    say "packages installed"
}

# ---------------------------------------------------------------- config
mem_mb() {
    local total
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # leave room for the daemons and mariadb; slurmd drains the node if
    # RealMemory is above what it finds
    if ((total > 4096)); then echo $((total - 1024)); else echo $((total * 9 / 10)); fi
}

db_password() {
    local f=$ETC/db.pass
    [[ -s $f ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$f")
    cat "$f"
}

# put_file PATH MODE: write stdin to PATH only if the content changed.
put_file() {
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if [[ -e $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$1"
        say "wrote $1"
    fi
}

write_config() {
    local cpus real_cpus mem overrides="" pass
    real_cpus=$(nproc)
    cpus=${POLAR_CLUSTER_CPUS:-$real_cpus}
    mem=${POLAR_CLUSTER_MEM_MB:-$(mem_mb)}
    ((cpus > real_cpus)) && overrides="SlurmdParameters=config_overrides"
    pass=$(db_password)
    put_file "$ETC/slurm.conf" 644 <<EOF
# Written by scripts/dev-cluster.sh; rewritten on each 'up'. Single node, root.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start
# again (default 120 s): keep requeue-after-timeout tests short
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
PropagateResourceLimits=NONE
SchedulerType=sched/backfill
# a tiny cluster can afford to look at its queue often (defaults 60 s / 30 s)
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
$overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# short timeouts: a test cluster should notice and act quickly; jobs that hit
# their time limit are signalled (SIGTERM, then SIGKILL after KillWait) at once
SlurmctldTimeout=10
SlurmdTimeout=20
MessageTimeout=10
TCPTimeout=2
BatchStartTimeout=10
InactiveLimit=0
KillWait=5
OverTimeLimit=0
Waittime=0
MinJobAge=300
UnkillableStepTimeout=60
# accounting: submitit polls sacct
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF: 600, SlurmUser
    put_file "$ETC/slurmdbd.conf" 600 <<EOF
# Written by scripts/dev-cluster.sh
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    chown root:root "$ETC/slurmdbd.conf"
    put_file "$ETC/my.cnf" 644 <<EOF
# Written by scripts/dev-cluster.sh: a private MariaDB for slurmdbd
[mysqld]
user=mysql
datadir=$DIR/mysql
socket=$RUN/mysql/mysqld.sock
pid-file=$RUN/mysql/mariadbd.pid
log-error=$LOG/mysql/mariadb.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_buffer_pool_size=1024M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
[client]
socket=$RUN/mysql/mysqld.sock
EOF
}

# /etc/slurm/slurm.conf -> our slurm.conf, so clients work without SLURM_CONF.
# Replaced only when missing, dangling or pointing at a dev-cluster config.
link_etc() {
    [[ $LINK_ETC == 1 ]] || return 0
    local target=/etc/slurm/slurm.conf
    [[ $(readlink "$target" 2>/dev/null) == "$ETC/slurm.conf" ]] && return 0
    if [[ ! -e $target ]] || { [[ -L $target ]] && grep -q '^# Written by scripts/dev-cluster.sh' "$target"; }; then
        mkdir -p /etc/slurm
        ln -sfn "$ETC/slurm.conf" "$target"
        say "linked $target -> $ETC/slurm.conf"
    else
        say "note: $target is not ours; clients need SLURM_CONF=$ETC/slurm.conf"
    fi
}

make_dirs() {
    install -d -m 755 "$DIR" "$ETC" "$RUN" "$LOG" "$DIR/spool"
    install -d -m 700 "$DIR/state"
    if id mysql >/dev/null 2>&1; then
        install -d -m 750 -o mysql -g mysql "$DIR/mysql"
        install -d -m 755 -o mysql -g mysql "$RUN/mysql" "$LOG/mysql"
    fi
}

# ---------------------------------------------------------------- daemons
start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then say "munged already running"; return; fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        say "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    # munged refuses to run as root
    runuser -u munge -- /usr/sbin/munged
    wait_for "$WAIT_S" munged sh -c 'munge -n | unmunge' || die "munged did not start (/var/log/munge/munged.log)"
}

start_mariadb() {
    if running mariadbd; then say "mariadb already running"; return; fi
    if [[ ! -d $DIR/mysql/mysql ]]; then
        say "initialising the accounting database in $DIR/mysql"
        mariadb-install-db --defaults-file="$ETC/my.cnf" --user=mysql --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mysql/install.log" 2>&1 ||
            die "mariadb-install-db failed (log: $LOG/mysql/install.log)"
    fi
    # no service manager: start the server detached, as user mysql
    setsid mariadbd --defaults-file="$ETC/my.cnf" </dev/null >>"$LOG/mysql/mariadb.out" 2>&1 &
    wait_daemon mariadbd mariadb-admin --defaults-file="$ETC/my.cnf" ping
}

setup_database() {
    local pass
    pass=$(db_password)
    # root logs in through the socket (unix_socket auth)
    mariadb --defaults-file="$ETC/my.cnf" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

# wait_daemon NAME CHECK...: wait until CHECK succeeds; fail early when the
# daemon NAME has died (a port in use, a bad config: see its log).
wait_daemon() {
    local name=$1 log=$LOG/$1.log start
    shift
    [[ $name == mariadbd ]] && log=$LOG/mysql/mariadb.log
    start=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) - start > 3)) && ! running "$name"; then
            tail -5 "$log" >&2 2>/dev/null || true
            die "$name exited while starting (log: $log)"
        fi
        (($(date +%s) - start < WAIT_S)) || die "$name did not come up in $WAIT_S s (log: $log)"
        sleep 0.2
    done
    say "$name ready"
}

start_slurm_daemon() {  # NAME CHECK...
    local name=$1
    shift
    if running "$name"; then say "$name already running"; return; fi
    "/usr/sbin/$name" || die "$name failed to start (log: $LOG/$name.log)"
    wait_daemon "$name" "$@"
}

register_accounts() {
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
        sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
        say "registered cluster $CLUSTER"
    fi
    if [[ -z $(sacctmgr -n -P list account polar format=account 2>/dev/null) ]]; then
        sacctmgr -i -Q add account polar Cluster="$CLUSTER" Description=polar Organization=polar >/dev/null
        sacctmgr -i -Q add user root Account=polar Cluster="$CLUSTER" >/dev/null
        say "registered account polar (user root)"
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }
node_responding() { local s; s=$(node_state); [[ -n $s && $s != *'*' ]]; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
sacct_answers() { sacct -n -X -S now -o JobID >/dev/null 2>&1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
dbd_up() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }

print_env() { echo "export SLURM_CONF=$SLURM_CONF"; }

# ---------------------------------------------------------------- commands
cmd_up() {
    [[ $(id -u) == 0 ]] || die "run as root (SlurmUser=root, munged via runuser)"
    if all_running && node_usable && sacct_answers; then
        say "cluster already up"
        print_env
        return 0
    fi
    mkdir -p "$LOG"
    install_packages
    make_dirs
    write_config
    start_munge
    start_mariadb
    setup_database
    start_slurm_daemon slurmdbd dbd_up
    register_accounts
    start_slurm_daemon slurmctld ctld_up
    start_slurm_daemon slurmd node_responding
    # a node that was down when slurmctld last saw it comes back by itself
    # (ReturnToService=2); a drained one needs a nudge
    local state
    state=$(node_state)
    if [[ $state =~ ^(drain|drained|draining|down|fail|failing)$ ]]; then
        say "node $NODE is $state: resuming it"
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    fi
    wait_for "$WAIT_S" "node $NODE" node_usable || die "node not usable: $(sinfo -N -l 2>&1)"
    wait_for "$WAIT_S" sacct sacct_answers || die "sacct does not answer"
    link_etc
    say "cluster up"
    print_env
}

# Cancel every job, so that no job processes outlive slurmd and the
# accounting records say CANCELLED. POLAR_CLUSTER_KEEP_JOBS=1 keeps them.
cancel_jobs() {
    [[ ${POLAR_CLUSTER_KEEP_JOBS:-0} == 1 ]] && return 0
    running slurmctld && ctld_up || return 0
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    say "cancelling jobs: $jobs(POLAR_CLUSTER_KEEP_JOBS=1 keeps them)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    say "jobs still listed after 15 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
}

cmd_down() {
    cancel_jobs
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon slurmdbd
    stop_daemon mariadbd  # SIGTERM is mariadb's normal shutdown
    stop_daemon munged
    say "cluster down (state kept in $DIR)"
}

DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
all_running() {
    local d
    for d in "${DAEMONS[@]}"; do running "$d" || return 1; done
}

cmd_status() {
    local d ok=0
    for d in "${DAEMONS[@]}"; do
        if running "$d"; then
            printf '%-10s running (pid %s)\n' "$d" "$(pid_of "$d")"
        else
            printf '%-10s stopped\n' "$d"
            ok=1
        fi
    done
    echo "SLURM_CONF=$SLURM_CONF"
    if ((ok == 0)); then
        sinfo -N -l 2>&1 || true
        if ! node_usable; then echo "node $NODE is not usable (state: $(node_state))"; ok=1; fi
        if ! sacct_answers; then echo "sacct does not answer"; ok=1; fi
    fi
    if ((ok == 0)); then echo "cluster usable"; else echo "cluster NOT usable"; fi
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    *)
        echo "usage: $0 up|down|status|env" >&2
        exit 2
        ;;
esac
