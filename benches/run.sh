#!/usr/bin/env bash
# Side-by-side NBD benchmark: tether (1 and 3 replicas) against qemu-nbd, nbdkit and
# nbd-server, on the fio profiles P1-P6 of BENCHMARKS.md.
#
# Why it is shaped like this (see BENCHMARKS.md): the machines are small and shared, so
# one run proves nothing. Every system runs every profile once per round, the rounds
# alternate (round -> profile -> system), and the table reports the median of the rounds
# with the min-max spread. Each (round, profile, system) gets a freshly started server on
# a fresh backing store, so no run inherits another's cache, allocation or state.
#
# Usage: benches/run.sh [options]
#   --rounds N        rounds (default 3)
#   --runtime S       seconds measured per run, after a 3 s ramp (default 20)
#   --size SIZE       volume / file size, e.g. 64m, 1g (default 1g)
#   --profiles LIST   comma-separated, from P1..P6 (default all)
#   --systems LIST    comma-separated, from tether1,tether3,qemu-nbd,nbdkit,nbd-server,
#                     and tether1-enc (encrypted), tether1-tls (mutual TLS to the replica),
#                     tether3-sec (3 replicas, encrypted and mutual TLS: what `tether up`
#                     runs) (default: tether1,tether3,qemu-nbd,nbdkit,nbd-server)
#   --tether BIN      tether binary (default target/release/tether, relative to the repo)
#   --tether-prev BIN an older tether binary, run as the systems tether1-prev and
#                     tether3-prev (e.g. the previous store, to compare in one run)
#   --out FILE        also write the markdown report to FILE
#   --keep DIR        keep raw fio JSONs, fill JSONs and server logs in DIR (must not
#                     already hold results); rerun the table with benches/summarize.py DIR
#   --tmpdir DIR      where the scratch dir goes (default $TMPDIR, else /var/tmp). Must be
#                     a real disk: qemu-nbd --cache=none needs O_DIRECT, tmpfs has none.
#   --start-timeout S seconds to wait for a server to accept NBD connections (default 30)
#
# Needs: bash, fio with the nbd engine, python3; nbdinfo (libnbd-bin) is used for the
# readiness check when present. Missing servers are skipped with a warning.

set -uo pipefail   # no -e: one failed run must not end a long benchmark; errors are checked

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
# The command as typed, quoted only where a shell needs it (printf %q alone escapes commas).
quote_args() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
    done
    echo "${out[*]}"
}
COMMAND_LINE=$(quote_args "$0" "$@")

ALL_PROFILES=(P1 P2 P3 P4 P5 P6)
ALL_SYSTEMS=(tether1 tether3 qemu-nbd nbdkit nbd-server tether1-enc tether1-tls tether3-sec tether1-prev tether3-prev)
DEFAULT_SYSTEMS=(tether1 tether3 qemu-nbd nbdkit nbd-server)

ROUNDS=3
RUNTIME=20
RAMP=3
SIZE=1g
PROFILES=$(IFS=,; echo "${ALL_PROFILES[*]}")
SYSTEMS=$(IFS=,; echo "${DEFAULT_SYSTEMS[*]}")
TETHER=target/release/tether
TETHER_PREV=
OUT=
KEEP=
TMP_PARENT=${TMPDIR:-/var/tmp}
START_TIMEOUT=30

log()  { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[bench] WARNING: %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Needs:/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds)        ROUNDS=$2; shift 2 ;;
        --runtime)       RUNTIME=$2; shift 2 ;;
        --size)          SIZE=$2; shift 2 ;;
        --profiles)      PROFILES=$2; shift 2 ;;
        --systems)       SYSTEMS=$2; shift 2 ;;
        --tether)        TETHER=$2; shift 2 ;;
        --tether-prev)   TETHER_PREV=$2; shift 2 ;;
        --out)           OUT=$2; shift 2 ;;
        --keep)          KEEP=$2; shift 2 ;;
        --tmpdir)        TMP_PARENT=$2; shift 2 ;;
        --start-timeout) START_TIMEOUT=$2; shift 2 ;;
        -h|--help)       usage 0 ;;
        *)               warn "unknown argument: $1"; usage 2 ;;
    esac
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]]        || die "--rounds must be a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]]       || die "--runtime must be a positive integer (seconds)"
[[ $START_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--start-timeout must be a positive integer"
IFS=, read -r -a PROFILE_LIST <<<"$PROFILES"
IFS=, read -r -a SYSTEM_LIST  <<<"$SYSTEMS"
for p in "${PROFILE_LIST[@]}"; do
    [[ " ${ALL_PROFILES[*]} " == *" $p "* ]] || die "unknown profile '$p' (known: ${ALL_PROFILES[*]})"
done
for s in "${SYSTEM_LIST[@]}"; do
    [[ " ${ALL_SYSTEMS[*]} " == *" $s "* ]] || die "unknown system '$s' (known: ${ALL_SYSTEMS[*]})"
done
# A relative --tether is taken from the repo root, so the script works from any cwd.
[[ $TETHER == /* ]] || TETHER=$REPO/$TETHER
[[ -z ${TETHER_PREV:-} || $TETHER_PREV == /* ]] || TETHER_PREV=$REPO/$TETHER_PREV

command -v python3 >/dev/null || die "python3 is required (fio JSON parsing, free ports)"
command -v fio >/dev/null     || die "fio is required (apt-get install fio)"
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (needs fio >= 3.20 built with libnbd)"
HAVE_NBDINFO=0
if command -v nbdinfo >/dev/null; then HAVE_NBDINFO=1
else warn "nbdinfo not found (libnbd-bin): readiness is checked by TCP connect only, export size is not verified"
fi

# Size in bytes: fio and truncate get the exact byte count; tether gets --size as typed.
SIZE_BYTES=$(python3 - "$SIZE" <<'EOF'
import re, sys
m = re.fullmatch(r'(\d+)\s*([kmgt]?)(i?b)?', sys.argv[1].strip().lower())
if not m:
    sys.exit(1)
print(int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
EOF
) || die "cannot parse --size '$SIZE' (use e.g. 64m, 1g)"

# ---------------------------------------------------------------------------------------
# Scratch space and cleanup. Everything we start is recorded so that the trap can stop it
# by pid; nothing is killed by name.

mkdir -p "$TMP_PARENT" || die "cannot create --tmpdir $TMP_PARENT"
WORK=$(mktemp -d "$TMP_PARENT/tether-bench.XXXXXX") || die "mktemp in $TMP_PARENT failed"
# Absolute, because nbd-server daemonizes into / and reads the export path from its config.
WORK=$(cd "$WORK" && pwd)
[[ $(stat -f -c %T "$WORK") == tmpfs ]] && \
    warn "$WORK is on tmpfs: no O_DIRECT (qemu-nbd --cache=none fails) and RAM-backed; use --tmpdir"

# The largest run is tether3 with a filled volume: three replicas each holding SIZE.
avail=$(df -B1 --output=avail "$WORK" | tail -n1 | tr -d ' ')
((avail > 3 * SIZE_BYTES + 2**30)) || \
    warn "only $((avail / 2**20)) MiB free under $WORK; tether3 with --size $SIZE needs about $((3 * SIZE_BYTES / 2**20)) MiB"

PIDS=()        # servers started in the foreground (and fio), stopped on exit
PIDFILES=()    # daemons that fork away (nbd-server): their pid is read from the pid file
CLEANED=0

# Stop one process: SIGTERM, up to 5 s grace, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null   # reap it if it is our child; harmless otherwise
    return 0
}

# nbd-server forks one child per connection; stop those children (by pid) and the daemon.
stop_pidfile() {
    local pf=$1 pid child
    [[ -s $pf ]] || return 0
    pid=$(<"$pf")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do stop_pid "$child"; done
    stop_pid "$pid"
}

stop_servers() {
    local pid pf
    for pf in "${PIDFILES[@]}"; do stop_pidfile "$pf"; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=(); PIDFILES=()
}

# shellcheck disable=SC2317  # only reached through the traps
cleanup() {
    ((CLEANED)) && return
    CLEANED=1
    stop_servers
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'warn "interrupted"; cleanup; exit 130' INT
trap 'warn "terminated"; cleanup; exit 143' TERM

RESULTS=${KEEP:-$WORK/results}
if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP" || die "cannot create --keep $KEEP"
    compgen -G "$KEEP/*.json" >/dev/null && die "--keep $KEEP already holds results; use an empty dir"
fi
mkdir -p "$RESULTS/fill" "$RESULTS/logs"
: >"$RESULTS/failures.txt"

# N distinct free loopback ports. All sockets are bound at once, so the ports differ; the
# window between closing them and the server binding is small on an idle loopback.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Wait until something listens on a TCP port (used for tether replicas, which are not NBD).
# $1 port, $2 pid to watch (empty: none), $3 log, $4 label
wait_tcp() {
    local port=$1 pid=$2 logf=$3 what=$4 deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        tcp_open "$port" && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            warn "$what exited before listening on port $port; last log lines:"
            tail -n 20 "$logf" >&2
            return 1
        fi
        sleep 0.2
    done
    warn "$what did not listen on 127.0.0.1:$port within ${START_TIMEOUT}s; last log lines:"
    tail -n 20 "$logf" >&2
    return 1
}

# Wait until the NBD export answers a full handshake (nbdinfo --size does NBD_OPT_GO, as
# fio's libnbd does) and has the expected size. $1 uri, $2 pid to watch, $3 log, $4 label
wait_nbd() {
    local uri=$1 pid=$2 logf=$3 what=$4 deadline=$((SECONDS + START_TIMEOUT)) got port
    port=${uri#nbd://127.0.0.1:}; port=${port%%/*}
    while ((SECONDS < deadline)); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            warn "$what exited before serving $uri; last log lines:"
            tail -n 20 "$logf" >&2
            return 1
        fi
        # Probe the port first so nbdinfo does not print connection-refused noise.
        if tcp_open "$port"; then
            if ((HAVE_NBDINFO == 0)); then return 0; fi
            if got=$(nbdinfo --size "$uri" 2>>"$logf"); then
                [[ $got == "$SIZE_BYTES" ]] && return 0
                warn "$what serves $uri with size $got, expected $SIZE_BYTES (--size $SIZE)"
                return 1
            fi
        fi
        sleep 0.2
    done
    warn "$what did not serve $uri within ${START_TIMEOUT}s; last log lines:"
    tail -n 20 "$logf" >&2
    return 1
}

# ---------------------------------------------------------------------------------------
# Systems. start_<system> DIR starts the server(s) with data in DIR, sets URI, and returns
# non-zero (after printing why) if it is not serving. stop_servers stops them again.

URI=
QEMU_AIO=io_uring

start_tether() {   # $1 dir, $2 number of replicas, $3 "enc", "tls" or "enc,tls" (optional), $4 binary
    local dir=$1 n=$2 security=${3:-} TETHER=${4:-$TETHER} ports i rport logf replica_args=() tls_replica=() tls_engine=() enc=()
    if [[ $security == *tls* ]]; then
        "$TETHER" tls init "$dir/pki" >/dev/null || return 1
        tls_replica=(--tls-cert "$dir/pki/server-cert.pem" --tls-key "$dir/pki/server-key.pem" --tls-ca "$dir/pki/ca-cert.pem")
        tls_engine=(--tls-cert "$dir/pki/client-cert.pem" --tls-key "$dir/pki/client-key.pem" --tls-ca "$dir/pki/ca-cert.pem")
    fi
    if [[ $security == *enc* ]]; then
        head -c 32 /dev/urandom >"$dir/key" || return 1
        enc=(--encryption-key-file "$dir/key")
    fi
    read -r -a ports <<<"$(free_ports $((n + 1)))"
    for ((i = 1; i <= n; i++)); do
        rport=${ports[i]}
        logf=$dir/replica$i.log
        mkdir -p "$dir/r$i"
        "$TETHER" replica --listen "127.0.0.1:$rport" --data "$dir/r$i" "${tls_replica[@]}" >"$logf" 2>&1 &
        PIDS+=($!)
        wait_tcp "$rport" "$!" "$logf" "tether replica $i" || return 1
        replica_args+=(--replica "127.0.0.1:$rport")
    done
    logf=$dir/engine.log
    "$TETHER" engine --volume bench --size "$SIZE" "${replica_args[@]}" "${tls_engine[@]}" "${enc[@]}" \
        --nbd-listen "127.0.0.1:${ports[0]}" --control-socket "$dir/bench.sock" >"$logf" 2>&1 &
    PIDS+=($!)
    URI=nbd://127.0.0.1:${ports[0]}/bench
    wait_nbd "$URI" "$!" "$logf" "tether engine ($n replica(s))"
}

start_qemu_nbd() {   # $1 dir [$2 aio mode]
    local dir=$1 aio=${2:-$QEMU_AIO} port
    port=$(free_ports 1)
    truncate -s "$SIZE_BYTES" "$dir/disk.img"
    # -t: keep serving after the first client leaves (probe, fill, then the run).
    # --shared=8: allow more than one client at a time (qemu-nbd's default is 1).
    # --cache=none: O_DIRECT on the image, as in BENCHMARKS.md.  -b: loopback only.
    qemu-nbd -f raw -t -p "$port" -b 127.0.0.1 --cache=none --aio="$aio" --shared=8 \
        "$dir/disk.img" >"$dir/qemu-nbd.log" 2>&1 &
    PIDS+=($!)
    URI=nbd://127.0.0.1:$port/
    wait_nbd "$URI" "$!" "$dir/qemu-nbd.log" "qemu-nbd (--aio=$aio)"
}

start_nbdkit() {   # $1 dir
    local dir=$1 port
    port=$(free_ports 1)
    truncate -s "$SIZE_BYTES" "$dir/disk.img"
    # -f: foreground, so we hold its pid.  --exit-with-parent: it goes even if this
    # script is SIGKILLed and the trap never runs.
    nbdkit -f -i 127.0.0.1 -p "$port" --exit-with-parent file "$dir/disk.img" \
        >"$dir/nbdkit.log" 2>&1 &
    PIDS+=($!)
    URI=nbd://127.0.0.1:$port/
    wait_nbd "$URI" "$!" "$dir/nbdkit.log" "nbdkit"
}

start_nbd_server() {   # $1 dir
    local dir=$1 port i
    port=$(free_ports 1)
    truncate -s "$SIZE_BYTES" "$dir/disk.img"
    # flush = true: without it nbd-server does not advertise NBD_CMD_FLUSH and P6 measures
    # nothing durable.
    cat >"$dir/nbd-server.conf" <<EOF
[generic]
port = $port
listenaddr = 127.0.0.1
[bench]
exportname = $dir/disk.img
flush = true
EOF
    # nbd-server has no usable foreground mode: -d ("do not fork") serves exactly one
    # connection and then exits, which kills the readiness probe -> fill -> run sequence.
    # So it daemonizes, and we stop it through its pid file (see stop_pidfile).
    PIDFILES+=("$dir/nbd-server.pid")
    nbd-server -C "$dir/nbd-server.conf" -p "$dir/nbd-server.pid" >"$dir/nbd-server.log" 2>&1 \
        || { warn "nbd-server failed to start:"; tail -n 20 "$dir/nbd-server.log" >&2; return 1; }
    for ((i = 0; i < 50; i++)); do
        [[ -s $dir/nbd-server.pid ]] && break
        sleep 0.1
    done
    [[ -s $dir/nbd-server.pid ]] || { warn "nbd-server wrote no pid file (it logs to syslog)"; return 1; }
    URI=nbd://127.0.0.1:$port/bench
    wait_nbd "$URI" "$(<"$dir/nbd-server.pid")" "$dir/nbd-server.log" "nbd-server"
}

start_system() {   # $1 system, $2 dir
    case $1 in
        tether1)    start_tether "$2" 1 ;;
        tether3)    start_tether "$2" 3 ;;
        tether1-enc) start_tether "$2" 1 enc ;;
        tether1-tls) start_tether "$2" 1 tls ;;
        tether3-sec) start_tether "$2" 3 enc,tls ;;
        tether1-prev) start_tether "$2" 1 "" "$TETHER_PREV" ;;
        tether3-prev) start_tether "$2" 3 "" "$TETHER_PREV" ;;
        qemu-nbd)   start_qemu_nbd "$2" ;;
        nbdkit)     start_nbdkit "$2" ;;
        nbd-server) start_nbd_server "$2" ;;
    esac
}

system_available() {   # prints why not, on failure
    case $1 in
        tether*-prev) [[ -n ${TETHER_PREV:-} && -x $TETHER_PREV ]] || { echo "no --tether-prev binary given"; return 1; } ;;
        tether*) [[ -x $TETHER ]] || { echo "tether binary $TETHER not found (build it, or --tether BIN)"; return 1; } ;;
        *) command -v "$1" >/dev/null || { echo "$1 not installed"; return 1; } ;;
    esac
}

system_version() {
    case $1 in
        tether*) "$TETHER" --version 2>/dev/null | head -n1 ;;
        qemu-nbd)        qemu-nbd --version 2>/dev/null | head -n1 ;;
        nbdkit)          nbdkit --version 2>/dev/null | head -n1 ;;
        nbd-server)      nbd-server -V 2>&1 | grep -m1 -i version ;;
    esac
}

# ---------------------------------------------------------------------------------------
# Profiles (BENCHMARKS.md). Reads (P3, P5) are preceded by a sequential fill so they read
# real data, not holes that a server can answer without touching the disk.

profile_args() {
    case $1 in
        P1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
        P2) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        P3) echo "--rw=randread --bs=4k --iodepth=32" ;;
        P4) echo "--rw=write --bs=1M --iodepth=8" ;;
        P5) echo "--rw=read --bs=1M --iodepth=8" ;;
        P6) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
    esac
}
needs_fill() { [[ $1 == P3 || $1 == P5 ]]; }

# Run fio in the background and wait for it, so INT/TERM traps fire at once instead of
# after fio ends; `timeout` guards against a server that hangs mid-run.
# $1 time limit (s), $2 log file, rest: fio arguments
run_fio() {
    local limit=$1 logf=$2 pid rc
    shift 2
    timeout --kill-after=10 "$limit" fio "$@" >>"$logf" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid"; rc=$?
    return "$rc"
}

fail() {   # $1 round, $2 profile, $3 system, $4 reason
    warn "round $1 $2 $3: $4"
    printf '%s %s %s %s\n' "$1" "$2" "$3" "$4" >>"$RESULTS/failures.txt"
}

# One (round, profile, system): fresh dir, start, fill if needed, measure, stop, clean.
run_one() {
    local round=$1 profile=$2 system=$3 dir tag json rc
    tag=$round-$profile-$system
    dir=$WORK/run-$tag
    mkdir -p "$dir"
    json=$RESULTS/$tag.json
    log "round $round/$ROUNDS  $profile  $system"
    if start_system "$system" "$dir"; then
        if needs_fill "$profile" && ! run_fio $((SIZE_BYTES / 1048576 + 300)) "$dir/fio.log" \
                --name=fill --ioengine=nbd --uri="$URI" --size="$SIZE_BYTES" \
                --rw=write --bs=1M --iodepth=8 --direct=1 \
                --output-format=json --output="$RESULTS/fill/$tag.json"; then
            fail "$round" "$profile" "$system" "fill pass failed (see logs/$tag/fio.log)"
        else
            # shellcheck disable=SC2046  # profile_args is meant to split into words
            run_fio $((RAMP + RUNTIME * 2 + 120)) "$dir/fio.log" \
                --name="$profile" --ioengine=nbd --uri="$URI" --size="$SIZE_BYTES" \
                $(profile_args "$profile") \
                --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --direct=1 \
                --output-format=json --output="$json"
            rc=$?
            if ((rc != 0)); then
                [[ -f $json ]] && mv "$json" "${json%.json}.failed"   # keep, but out of the table
                fail "$round" "$profile" "$system" "fio exited $rc (see logs/$tag/fio.log)"
            fi
        fi
    else
        fail "$round" "$profile" "$system" "server did not start (see logs/$tag/)"
    fi
    stop_servers
    # Keep logs (small), drop data; sync so the next run does not pay for this one's
    # writeback.
    mkdir -p "$RESULTS/logs/$tag"
    find "$dir" -maxdepth 1 -name '*.log' -exec cp {} "$RESULTS/logs/$tag/" \;
    rm -rf "$dir"
    sync -f "$WORK" 2>/dev/null || sync
}

# ---------------------------------------------------------------------------------------
# Preflight: which systems can run at all.

RUN_SYSTEMS=()
NOTES=()
for s in "${SYSTEM_LIST[@]}"; do
    if why=$(system_available "$s"); then RUN_SYSTEMS+=("$s")
    else warn "skipping $s: $why"; NOTES+=("skipped $s: $why")
    fi
done
((${#RUN_SYSTEMS[@]})) || die "none of the requested systems is available"

# qemu-nbd: io_uring can be missing (old kernel, seccomp, container). Decide once, before
# measuring, so all rounds use the same mode.
if [[ " ${RUN_SYSTEMS[*]} " == *" qemu-nbd "* ]]; then
    dir=$WORK/preflight-qemu
    mkdir -p "$dir"
    if start_qemu_nbd "$dir" io_uring 2>"$dir/probe.err"; then
        QEMU_AIO=io_uring
    else
        QEMU_AIO=threads
        reason=$(grep -m1 -i -E 'uring|error' "$dir/qemu-nbd.log" || echo "see qemu-nbd log")
        warn "qemu-nbd --aio=io_uring does not work here ($reason); using --aio=threads"
        NOTES+=("qemu-nbd runs with --aio=threads: --aio=io_uring failed ($reason)")
    fi
    stop_servers
    rm -rf "$dir"
fi

# ---------------------------------------------------------------------------------------
# Machine facts and the exact command, written first so a partial run is still labelled.

git_rev() {
    local rev
    rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || { echo "no commit"; return; }
    git -C "$REPO" diff --quiet HEAD 2>/dev/null || rev="$rev (dirty)"
    echo "$rev"
}

{
    echo "# tether benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- command: \`$COMMAND_LINE\`"
    echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r)"
    echo "- scratch filesystem: $(df -T "$WORK" | awk 'NR==2{print $2 " on " $1}')"
    v="not available"; [[ -x $TETHER ]] && v=$(system_version tether1)
    echo "- tether: ${v:-unknown version} ($TETHER, repo $(git_rev))"
    v="missing"; ((HAVE_NBDINFO)) && v=$(nbdinfo --version 2>/dev/null | head -n1)
    echo "- fio: $(fio --version); nbdinfo: $v"
    for s in qemu-nbd nbdkit nbd-server; do
        v="not installed"; command -v "$s" >/dev/null && v=$(system_version "$s")
        echo "- $s: $v"
    done
    echo "- setup: --size $SIZE ($SIZE_BYTES bytes), --runtime ${RUNTIME}s after --ramp_time ${RAMP}s, $ROUNDS round(s), fio --ioengine=nbd --direct=1, one job"
    echo "- order: for each round, for each profile (${PROFILE_LIST[*]}), systems in the order ${RUN_SYSTEMS[*]}; every run starts its server fresh on a fresh backing store and stops it afterwards; P3/P5 first fill the whole volume (fio --rw=write --bs=1M --iodepth=8) on the same server instance"
    echo "- qemu-nbd: -f raw -t --cache=none --aio=$QEMU_AIO --shared=8; nbdkit: file plugin; nbd-server: config with flush = true (daemonized, see run.sh)"
    for n in "${NOTES[@]}"; do echo "- note: $n"; done
} >"$RESULTS/meta.md"
cat "$RESULTS/meta.md" >&2
echo >&2

# ---------------------------------------------------------------------------------------
# The alternation: round -> profile -> system.

for ((round = 1; round <= ROUNDS; round++)); do
    for profile in "${PROFILE_LIST[@]}"; do
        for system in "${RUN_SYSTEMS[@]}"; do
            run_one "$round" "$profile" "$system"
        done
    done
done

summary_args=("$RESULTS")
[[ -n $OUT ]] && summary_args+=(--out "$OUT")
python3 "$SCRIPT_DIR/summarize.py" "${summary_args[@]}" || die "summarize.py failed (results in ${KEEP:-the removed scratch dir})"
[[ -n $KEEP ]] && log "raw results kept in $KEEP (rerun: benches/summarize.py $KEEP)"
if [[ -s $RESULTS/failures.txt ]]; then
    warn "$(wc -l <"$RESULTS/failures.txt") run(s) failed; see the report"
    exit 1
fi
exit 0
