#!/usr/bin/env bash
# PostgreSQL on tether beside PostgreSQL on qemu-nbd: the workload BENCHMARKS.md says
# matters most (small synced writes, FUA and journal commits through a file system).
#
# Each run starts one system fresh, attaches its export as a block device (nbdfuse ->
# loop device with direct I/O -> ext4), runs a new PostgreSQL 15 cluster on it, loads
# pgbench's tables and runs pgbench; then it tears everything down. The systems take
# turns within each round, and each round reverses the order of the one before, so
# neither always runs on a warmer machine. The table reports the median tps of the
# rounds with the spread, and each system's ratio to qemu-nbd.
#
# Usage: benches/pgbench.sh [options]
#   --rounds N        rounds (default 2)
#   --scale N         pgbench scale (default 10, about 160 MB of tables)
#   --clients N       pgbench clients (default 4)
#   --time S          seconds of pgbench per run (default 30)
#   --size SIZE       volume / file size (default 1g)
#   --systems LIST    comma-separated, from qemu-nbd, tether1, tether3, tether3-sec and
#                     the all-daemon variants tether1-net, tether3-net, tether3-sec-net,
#                     and tether3-grpc, tether3-sec-grpc (I/O streams on gRPC)
#                     (see run.sh; default qemu-nbd,tether1,tether3,tether3-sec)
#   --tether BIN      tether binary (default target/release/tether, relative to the repo)
#   --tether-prev BIN an older tether binary, run as the systems tether1-prev and
#                     tether3-prev (every replica a daemon) and tether3-sec-prev (placed
#                     as tether3-sec), to compare builds in one run
#   --out FILE        also write the markdown report to FILE
#   --tmpdir DIR      where the scratch dir goes (default $TMPDIR, else /var/tmp; a real
#                     disk: qemu-nbd --cache=none needs O_DIRECT)
#
# Needs: root (losetup, mount), PostgreSQL 15 (/usr/lib/postgresql/15/bin), nbdfuse,
# qemu-nbd, e2fsprogs, python3; nbdinfo for the readiness check when present.

set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
PG=/usr/lib/postgresql/15/bin

ROUNDS=2
SCALE=10
CLIENTS=4
TIME=30
SIZE=1g
SYSTEMS=qemu-nbd,tether1,tether3,tether3-sec
TETHER=target/release/tether
TETHER_PREV=
OUT=
TMP_PARENT=${TMPDIR:-/var/tmp}
START_TIMEOUT=60
ALL_SYSTEMS=(qemu-nbd tether1 tether3 tether3-sec tether1-net tether3-net tether3-sec-net tether3-grpc tether3-sec-grpc tether1-prev tether3-prev tether3-sec-prev)

log()  { printf '[pgbench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[pgbench] WARNING: %s\n' "$*" >&2; }
die()  { printf '[pgbench] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Needs:/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

COMMAND="benches/pgbench.sh $*"
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds)  ROUNDS=${2:-}; shift 2 ;;
        --scale)   SCALE=${2:-}; shift 2 ;;
        --clients) CLIENTS=${2:-}; shift 2 ;;
        --time)    TIME=${2:-}; shift 2 ;;
        --size)    SIZE=${2:-}; shift 2 ;;
        --systems) SYSTEMS=${2:-}; shift 2 ;;
        --tether)  TETHER=${2:-}; shift 2 ;;
        --tether-prev) TETHER_PREV=${2:-}; shift 2 ;;
        --out)     OUT=${2:-}; shift 2 ;;
        --tmpdir)  TMP_PARENT=${2:-}; shift 2 ;;
        -h|--help) usage 0 ;;
        *)         warn "unknown argument: $1"; usage 2 ;;
    esac
done

for v in ROUNDS SCALE CLIENTS TIME; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v,,} must be a positive integer"
done
IFS=, read -r -a SYSTEM_LIST <<<"$SYSTEMS"
for s in "${SYSTEM_LIST[@]}"; do
    [[ " ${ALL_SYSTEMS[*]} " == *" $s "* ]] || die "unknown system '$s' (known: ${ALL_SYSTEMS[*]})"
done
[[ $TETHER == /* ]] || TETHER=$REPO/$TETHER
[[ -x $TETHER ]] || die "tether binary $TETHER not found (cargo build --release, or --tether BIN)"
if [[ -n $TETHER_PREV ]]; then
    [[ $TETHER_PREV == /* ]] || TETHER_PREV=$REPO/$TETHER_PREV
    [[ -x $TETHER_PREV ]] || die "--tether-prev binary $TETHER_PREV not found"
fi
for s in "${SYSTEM_LIST[@]}"; do
    [[ $s != *-prev || -n $TETHER_PREV ]] || die "system $s needs --tether-prev BIN"
done
((EUID == 0)) || die "run as root: the volume is attached with losetup and mounted"
for t in nbdfuse losetup mkfs.ext4 qemu-nbd python3 runuser; do
    command -v "$t" >/dev/null || die "$t is required"
done
[[ -x $PG/pg_ctl && -x $PG/pgbench ]] || die "PostgreSQL 15 is required ($PG; apt-get install postgresql-15)"
id postgres >/dev/null 2>&1 || die "the postgres user is missing (it comes with the postgresql package)"
HAVE_NBDINFO=0
command -v nbdinfo >/dev/null && HAVE_NBDINFO=1

SIZE_BYTES=$(python3 - "$SIZE" <<'EOF'
import re, sys
m = re.fullmatch(r'(\d+)\s*([kmgt]?)(i?b)?', sys.argv[1].strip().lower())
if not m:
    sys.exit(1)
print(int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
EOF
) || die "cannot parse --size '$SIZE' (use e.g. 1g)"

mkdir -p "$TMP_PARENT" || die "cannot create --tmpdir $TMP_PARENT"
WORK=$(mktemp -d "$TMP_PARENT/tether-pgbench.XXXXXX") || die "mktemp in $TMP_PARENT failed"
WORK=$(cd "$WORK" && pwd)
# PostgreSQL runs as postgres and must reach its data directory and socket under here.
chmod 755 "$WORK"

PIDS=()
PIDFILES=()
CLEANED=0
# What the current run attached, for teardown in the one order that works.
MNT= DEV= FUSE= FUSE_PID= PGDATA=

# shellcheck source=benches/servers.sh
source "$SCRIPT_DIR/servers.sh"

detach() {
    if [[ -n $PGDATA ]]; then
        runuser -u postgres -- "$PG/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
        PGDATA=
    fi
    [[ -n $MNT ]] && { umount "$MNT" 2>/dev/null; MNT=; }
    [[ -n $DEV ]] && { losetup -d "$DEV" 2>/dev/null; DEV=; }
    [[ -n $FUSE ]] && { umount "$FUSE" 2>/dev/null; FUSE=; }
    [[ -n $FUSE_PID ]] && { stop_pid "$FUSE_PID"; FUSE_PID=; }
    stop_servers
}

# shellcheck disable=SC2317  # only reached through the traps
cleanup() {
    ((CLEANED)) && return
    CLEANED=1
    detach
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'warn "interrupted"; cleanup; exit 130' INT
trap 'warn "terminated"; cleanup; exit 143' TERM

# One run: $1 system, $2 dir. Sets TPS; non-zero on failure. Runs in this shell (not in
# $(...)), so detach and the traps know what it started.
TPS=
run_one() {
    local sys=$1 dir=$2 i port out
    mkdir -p "$dir" && chmod 755 "$dir"
    start_system "$sys" "$dir" || return 1
    FUSE=$dir/fuse
    mkdir -p "$FUSE" "$dir/mnt"
    # -P: nbdfuse writes its pid once the mount is ready.
    nbdfuse -P "$dir/nbdfuse.pid" "$FUSE" "$URI" >"$dir/nbdfuse.log" 2>&1 &
    FUSE_PID=$!
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/nbdfuse.pid ]] && break
        kill -0 "$FUSE_PID" 2>/dev/null || { warn "$sys: nbdfuse exited"; cat "$dir/nbdfuse.log" >&2; return 1; }
        sleep 0.1
    done
    [[ -s $dir/nbdfuse.pid ]] || { warn "$sys: nbdfuse not ready within 10 s"; return 1; }
    DEV=$(losetup --find --show --direct-io=on "$FUSE/nbd") || { warn "$sys: losetup failed"; return 1; }
    # Tables and journal initialised now, not lazily in the background during the run.
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" >"$dir/mkfs.log" 2>&1 \
        || { warn "$sys: mkfs failed"; cat "$dir/mkfs.log" >&2; return 1; }
    mount "$DEV" "$dir/mnt" || { warn "$sys: mount failed"; return 1; }
    MNT=$dir/mnt
    # PostgreSQL runs as postgres: its socket and log go in a directory it owns.
    mkdir -p "$MNT/pg" "$dir/sock"
    chown postgres "$MNT/pg" "$dir/sock"
    runuser -u postgres -- "$PG/initdb" -D "$MNT/pg" >"$dir/initdb.log" 2>&1 \
        || { warn "$sys: initdb failed"; tail -n 20 "$dir/initdb.log" >&2; return 1; }
    port=$(free_ports 1)
    runuser -u postgres -- "$PG/pg_ctl" -D "$MNT/pg" -l "$dir/sock/postgres.log" -w \
        -o "-c listen_addresses='' -k $dir/sock -p $port" start >/dev/null 2>&1 \
        || { warn "$sys: PostgreSQL did not start"; tail -n 20 "$dir/sock/postgres.log" >&2; return 1; }
    PGDATA=$MNT/pg
    runuser -u postgres -- "$PG/pgbench" -h "$dir/sock" -p "$port" -i -s "$SCALE" -q postgres \
        >"$dir/init.log" 2>&1 || { warn "$sys: pgbench -i failed"; tail -n 20 "$dir/init.log" >&2; return 1; }
    # The load's dirty pages written out first, so every system starts the run alike.
    sync
    out=$(runuser -u postgres -- "$PG/pgbench" -h "$dir/sock" -p "$port" -c "$CLIENTS" -j 2 \
        -T "$TIME" postgres 2>"$dir/run.log") || { warn "$sys: pgbench failed"; tail -n 20 "$dir/run.log" >&2; return 1; }
    echo "$out" >"$dir/pgbench.out"
    TPS=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' <<<"$out")
    [[ -n $TPS ]] || { warn "$sys: no tps in pgbench's output"; echo "$out" >&2; return 1; }
    detach
}

RESULTS=$WORK/results.txt
: >"$RESULTS"
log "scratch $WORK; $ROUNDS round(s) of ${SYSTEM_LIST[*]}; pgbench scale $SCALE, $CLIENTS clients, ${TIME}s"
for ((round = 1; round <= ROUNDS; round++)); do
    order=("${SYSTEM_LIST[@]}")
    ((round % 2 == 0)) && mapfile -t order < <(printf '%s\n' "${SYSTEM_LIST[@]}" | tac)
    for sys in "${order[@]}"; do
        log "round $round/$ROUNDS: $sys"
        dir=$WORK/r$round-$sys
        if run_one "$sys" "$dir"; then
            log "round $round: $sys $TPS tps"
            echo "$sys $round $TPS" >>"$RESULTS"
        else
            warn "round $round: $sys failed (logs in $dir)"
            detach
            echo "$sys $round FAILED" >>"$RESULTS"
        fi
        rm -rf "$dir/r1" "$dir/r2" "$dir/r3" "$dir/disk.img"
    done
done

report=$(python3 - "$RESULTS" "$COMMAND" "$SCALE" "$CLIENTS" "$TIME" "$SIZE" "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" "${SYSTEM_LIST[@]}" <<'EOF'
import statistics, sys, datetime
path, command, scale, clients, time_s, size, rev, *systems = sys.argv[1:]
tps, failed = {}, {}
for line in open(path):
    s, rnd, v = line.split()
    if v == "FAILED":
        failed[s] = failed.get(s, 0) + 1
    else:
        tps.setdefault(s, []).append(float(v))
med = {s: statistics.median(v) for s, v in tps.items()}
print("# PostgreSQL (pgbench) on tether and qemu-nbd\n")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; tether at {rev}")
print(f"- command: `{command}`")
print(f"- pgbench scale {scale}, {clients} clients, {time_s} s; PostgreSQL 15 on ext4 on a loop device "
      f"(direct I/O) over nbdfuse; volume {size}; qemu-nbd -f raw --cache=none --aio=io_uring")
print("- tether1 and tether3: the first replica in the engine's process (dir:PATH), the "
      "others replica daemons on loopback; -net: every replica a daemon; -sec: encrypted, "
      "mutual TLS to the daemons\n")
print("| system | tps, median (min–max) | rounds | / qemu-nbd |")
print("| --- | --- | --- | --- |")
for s in systems:
    if s not in tps:
        print(f"| {s} | failed | 0 | |")
        continue
    v = tps[s]
    ratio = f"{med[s] / med['qemu-nbd']:.2f}×" if "qemu-nbd" in med and s != "qemu-nbd" else ""
    note = f" ({failed[s]} failed)" if s in failed else ""
    print(f"| {s} | {med[s]:,.0f} ({min(v):,.0f}–{max(v):,.0f}) | {len(v)}{note} | {ratio} |")
EOF
)
echo "$report"
[[ -n $OUT ]] && echo "$report" >"$OUT"
exit 0
