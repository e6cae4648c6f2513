#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing profiles/slurm against a real controller
# (docs/slurm.md). Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge.
#
#   scripts/local-slurm.sh start    # munged, slurmctld and one slurmd with this machine's cores and memory
#   export PATH=$PWD/.cache/local-slurm/bin:$PATH   # sbatch, srun, squeue, ... with this cluster's slurm.conf
#   scripts/local-slurm.sh status   # exit 0 and one line while the cluster answers, else exit 1
#   scripts/local-slurm.sh stop     # cancels its jobs, stops its daemons, removes every file it wrote
#
# Everything lives in a short folder of its own, /tmp/tokenclean-slurm-<uid>-<hash of the path below>, reached
# through $TOKENCLEAN_SLURM_DIR (default .cache/local-slurm of the repository, git-ignored), a link to it: the
# munge key it creates, slurm.conf, state, spool, logs, pid files and bin/ (the Slurm commands, each with
# SLURM_CONF set to this cluster's slurm.conf); `stop` removes both. Short because a Unix socket's path has at
# most 108 bytes: slurmstepd's socket is <SlurmdSpoolDir>/<node>_<job>.<step>, and under a clone 63 characters
# deep it was 122 bytes long, so no job could start (held: "launch failed requeued held"); the short folder also
# keeps paths with spaces out of slurm.conf, which has no quoting. It runs as the
# invoking user (root or not): SlurmUser is that user, and jobs run as that user. Partition `local` (MaxTime one
# day), node `localnode`. No accounting daemon (slurmdbd): job status comes from squeue, which knows finished jobs for
# MinJobAge (300 s) after they end. Ports: 6817/6818 if free, else a free pair from 6900 on, unless
# TOKENCLEAN_SLURM_PORTS="CTLD SLURMD" names them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${TOKENCLEAN_SLURM_DIR:-$ROOT/.cache/local-slurm}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
# the cluster's own folder: short (sockets), free of spaces (slurm.conf), one per $DIR and user
RUN="/tmp/tokenclean-slurm-$(id -u)-$(printf '%s' "$DIR" | sha256sum | cut -c1-10)"
FILES="$RUN"
# a cluster that an earlier version of this script started keeps everything in $DIR itself: status and stop find it
if [ -d "$DIR" ] && [ ! -L "$DIR" ]; then FILES="$DIR"; fi
CONF="$FILES/slurm.conf"
START_TIMEOUT="${TOKENCLEAN_SLURM_START_TIMEOUT:-60}"   # seconds for the node to come up
PARTITION=local
NODE=localnode

die() { echo "local-slurm: error: $*" >&2; exit 2; }

pid_alive() { local pid; pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# Wait (at most $2 seconds) for process $1 to end.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    return 1
}

# Stop the daemon of pid file $1 (TERM, then KILL after 10 s): only the process this script started.
stop_daemon() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 0
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || { kill -KILL "$pid" 2>/dev/null || true; wait_gone "$pid" 5 || true; }
    fi
    rm -f "$1"
}

# Two TCP ports free on this machine: Slurm's own 6817/6818 if no other cluster holds them, else the first free
# pair from 6900 on.
free_ports() {
    python3 - 2>/dev/null <<'EOF' || echo "6817 6818"
import socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False
pairs = [(6817, 6818)] + [(p, p + 1) for p in range(6900, 7100, 2)]
print(*next(pair for pair in pairs if all(map(free, pair))))
EOF
}

# The line that puts this cluster's commands first on PATH (quoted: the repository's path may hold spaces).
path_line() { printf 'export PATH=%q:$PATH\n' "$DIR/bin"; }

answers() { SLURM_CONF="$CONF" timeout 10 sinfo -h -p "$PARTITION" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

status() {
    if [ -f "$CONF" ] && pid_alive "$FILES/run/slurmctld.pid" && pid_alive "$FILES/run/slurmd.pid" && answers; then
        echo "local-slurm: running (partition $PARTITION, node $NODE: $(SLURM_CONF="$CONF" sinfo -h -N -o '%c CPUs, %m MB, %t'));" \
             "$(path_line)"
        return 0
    fi
    echo "local-slurm: not running (start it: scripts/local-slurm.sh start)"
    return 1
}

stop() {
    if [ -f "$CONF" ] && pid_alive "$FILES/run/slurmctld.pid"; then
        # the cluster's jobs first (their processes are slurmd's children), bounded
        SLURM_CONF="$CONF" timeout 10 scancel --full --partition "$PARTITION" 2>/dev/null || true
        for _ in $(seq 1 100); do
            [ -z "$(SLURM_CONF="$CONF" timeout 5 squeue -h -t running,completing,pending -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_daemon "$FILES/run/slurmd.pid"
    stop_daemon "$FILES/run/slurmctld.pid"
    stop_daemon "$FILES/run/munged.pid"
    rm -rf "$RUN"
    # the link (rm never follows it), or the folder an earlier version of this script kept everything in
    if [ -L "$DIR" ]; then rm -f "$DIR"
    elif [ -e "$DIR" ]; then
        case "$DIR" in */local-slurm*) rm -rf "$DIR" ;; *) die "refusing to remove $DIR (not a local-slurm folder)" ;; esac
    fi
    echo "local-slurm: stopped; $DIR and $RUN removed"
}

start() {
    local user uid slurmd_user ctld_port slurmd_port node_line mem cmd real
    for cmd in munged mungekey slurmctld slurmd sbatch squeue sinfo scancel scontrol; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] ||
            die "'$cmd' not found: install Slurm and munge (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge)"
    done
    export PATH="$PATH:/usr/sbin"
    if status >/dev/null 2>&1; then status; return 0; fi
    # leftovers of a cluster that died (or of a /tmp emptied at boot under the link): start clean
    if [ -e "$DIR" ] || [ -L "$DIR" ] || [ -e "$RUN" ]; then stop >/dev/null; fi
    FILES="$RUN"; CONF="$RUN/slurm.conf"
    user="$(id -un)"; uid="$(id -u)"
    # slurmd starts jobs as their user: as root it can serve anyone, as another user only that user
    slurmd_user="$user"
    read -r ctld_port slurmd_port <<<"${TOKENCLEAN_SLURM_PORTS:-$(free_ports)}"
    # /tmp is shared: the folder must be new and this user's (mkdir fails on anything already there)
    mkdir -m 700 "$RUN" || die "cannot create $RUN (does another user hold it?)"
    mkdir -p "$RUN"/{munge,state,log,run} "$RUN/spool/$NODE"
    chmod 700 "$RUN/munge"
    mkdir -p "$(dirname "$DIR")" && ln -s "$RUN" "$DIR" || { stop >/dev/null; die "cannot link $DIR to $RUN"; }

    # munge: a key of this cluster's own, its socket in $DIR
    mungekey --create --keyfile="$RUN/munge/munge.key" --bits=1024 2>/dev/null ||
        { dd if=/dev/urandom of="$RUN/munge/munge.key" bs=1 count=1024 status=none; }
    chmod 400 "$RUN/munge/munge.key"
    munged --force --socket="$RUN/munge/munge.socket" --key-file="$RUN/munge/munge.key" \
        --pid-file="$RUN/run/munged.pid" --log-file="$RUN/log/munged.log" --seed-file="$RUN/munge/munged.seed" \
        || { stop >/dev/null; die "munged did not start (log: $RUN/log/munged.log)"; }

    # the node as slurmd sees this machine (CPUs, sockets, cores, threads, memory)
    node_line="$(slurmd -C | head -1)"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
    node_line="$(sed "s/^NodeName=[^ ]*/NodeName=$NODE NodeHostname=$(hostname -s) NodeAddr=127.0.0.1/" <<<"$node_line")"
    cat > "$CONF" <<EOF
# written by scripts/local-slurm.sh start: a one-node cluster of this machine ($(hostname -s)), for user $user
ClusterName=tokenclean
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$slurmd_user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it starts again (Slurm's default 120 s)
AuthInfo=socket=$RUN/munge/munge.socket,cred_expire=10
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool/%n
SlurmctldPidFile=$RUN/run/slurmctld.pid
SlurmdPidFile=$RUN/run/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
# no cgroups, no accounting: processes tracked by process group, job status from the controller (squeue)
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
# cores and memory are what jobs are scheduled by: sbatch refuses a request beyond the node (memory, CPUs, GPUs)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Slurm's default EnforcePartLimits=NO, as on many clusters: a job beyond the partition's MaxTime is accepted and
# waits forever (PENDING, PartitionTimeLimit); the workflow's own check (tokenclean/slurm.py) stops it first
# finished jobs stay visible to squeue this long (the executor plugin reads their state there)
MinJobAge=300
# a cancelled or requeued job gets SIGTERM, then SIGKILL 5 s later
KillWait=5
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
JobRequeue=1
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=1-00:00:00 State=UP
EOF
    # The Slurm commands with this cluster's config: the jobstep executor plugin runs each job's command with
    # `srun` after removing every SLURM_* variable from its environment (SLURM_CONF included), so inside a job
    # only a command found on PATH knows where this cluster's config is (a real cluster's is in /etc/slurm/).
    mkdir -p "$RUN/bin"
    for cmd in sbatch srun squeue scancel sinfo scontrol sacct; do
        real="$(PATH="${PATH//"$DIR/bin:"/}"; PATH="${PATH//"$RUN/bin:"/}"; command -v "$cmd")" || continue
        printf '#!/bin/sh\nSLURM_CONF=%q exec %q "$@"\n' "$CONF" "$real" > "$RUN/bin/$cmd"
        chmod 755 "$RUN/bin/$cmd"
    done
    export SLURM_CONF="$CONF"
    # -c: no state from an earlier cluster; -i: ignore a stale state file
    slurmctld -c -i >"$RUN/log/slurmctld.out" 2>&1 || { stop >/dev/null; die "slurmctld did not start (log: $RUN/log/slurmctld.log)"; }
    slurmd -N "$NODE" >"$RUN/log/slurmd.out" 2>&1 || { stop >/dev/null; die "slurmd did not start (log: $RUN/log/slurmd.log)"; }
    local i
    for ((i = 0; i < START_TIMEOUT * 2; i++)); do
        if answers; then
            echo "local-slurm: started a one-node cluster (partition $PARTITION, $(sinfo -h -N -o '%c CPUs, %m MB'), user $user)"
            path_line
            return 0
        fi
        sleep 0.5
    done
    local why
    why="$(tail -n 3 "$RUN/log/slurmctld.log" "$RUN/log/slurmd.log" 2>/dev/null | tr '\n' ' ')"
    stop >/dev/null
    die "the node did not come up within ${START_TIMEOUT}s (memory ${mem} MB, uid $uid): $why"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) path_line ;;
    *) echo "usage: scripts/local-slurm.sh start|stop|status|env" >&2; exit 2 ;;
esac
