#!/usr/bin/env bash
# Instructions per request of the tether data path, counted by valgrind's callgrind.
#
# Wall-clock benchmarks (benches/run.sh) on small shared machines cannot show a 3%
# difference; instruction counts can. For each binary this starts one replica daemon and
# one engine (as run.sh's tether1), both under `valgrind --tool=callgrind`, drives a fixed
# fio request mix over NBD, stops both with SIGTERM (callgrind writes its counts at exit)
# and reads the total instructions (Ir) of each process.
#
# Startup, volume creation, the NBD handshakes and shutdown cost the same in every run, so
# each binary is run twice: with N requests and with N/10. The table reports the marginal
# cost, (Ir(N) - Ir(N/10)) / (requests(N) - requests(N/10)), which cancels them.
#
# The mix (fio, ioengine=nbd, iodepth 1, fixed seed, one job after the other):
#   4k random writes (N, a flush every 32), 4k random reads of the same offsets (N),
#   64k sequential writes (N/4, a flush every 32).
# A "request" is one NBD command that fio counted: reads + writes + flushes.
#
# Usage: benches/callgrind.sh --tether BIN [options]
#   --tether BIN        tether binary to measure (relative paths: from the repo root)
#   --tether-prev BIN   an older binary to compare with; the table adds new/prev
#   --requests N        4k writes and 4k reads per run (default 2000, at least 100)
#   --rounds R          measure each binary R times, alternating, and report the median
#                       with the min-max spread (default 3; about 40 s per binary and round)
#   --tmpdir DIR        where the scratch dir goes (default $TMPDIR, else /var/tmp)
#   --keep DIR          keep callgrind outputs, logs and fio JSONs in DIR
#   --start-timeout S   seconds to wait for a process under valgrind to serve (default 120)
#   --local             the replica in the engine's process (--replica dir:PATH), no daemon:
#                       the engine column is then the whole cost (both binaries must know
#                       dir: addresses)
#
# Needs: bash, valgrind, fio with the nbd engine, python3; nbdinfo (libnbd-bin) for the
# readiness check when present.

set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

TETHER=
TETHER_PREV=
REQUESTS=2000
ROUNDS=3
TMP_PARENT=${TMPDIR:-/var/tmp}
KEEP=
START_TIMEOUT=120
STOP_TIMEOUT=120
LOCAL=0

log()  { printf '[callgrind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[callgrind] WARNING: %s\n' "$*" >&2; }
die()  { printf '[callgrind] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Needs:/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --tether)        TETHER=${2:-}; shift 2 ;;
        --tether-prev)   TETHER_PREV=${2:-}; shift 2 ;;
        --requests)      REQUESTS=${2:-}; shift 2 ;;
        --rounds)        ROUNDS=${2:-}; shift 2 ;;
        --tmpdir)        TMP_PARENT=${2:-}; shift 2 ;;
        --keep)          KEEP=${2:-}; shift 2 ;;
        --start-timeout) START_TIMEOUT=${2:-}; shift 2 ;;
        --local)         LOCAL=1; shift ;;
        -h|--help)       usage 0 ;;
        *)               warn "unknown argument: $1"; usage 2 ;;
    esac
done

[[ -n $TETHER ]] || { warn "--tether BIN is required"; usage 2; }
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] && ((REQUESTS >= 100)) || die "--requests must be an integer >= 100"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]]        || die "--rounds must be a positive integer"
[[ $START_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--start-timeout must be a positive integer"
[[ $TETHER == /* ]] || TETHER=$REPO/$TETHER
[[ -z $TETHER_PREV || $TETHER_PREV == /* ]] || TETHER_PREV=$REPO/$TETHER_PREV
[[ -x $TETHER ]] || die "tether binary $TETHER not found or not executable"
[[ -z $TETHER_PREV || -x $TETHER_PREV ]] || die "tether binary $TETHER_PREV not found or not executable"

command -v valgrind >/dev/null || die "valgrind is required (apt-get install valgrind)"
command -v python3 >/dev/null  || die "python3 is required"
command -v fio >/dev/null      || die "fio is required (apt-get install fio)"
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (needs fio >= 3.20 built with libnbd)"
HAVE_NBDINFO=0
command -v nbdinfo >/dev/null && HAVE_NBDINFO=1

SMALL=$((REQUESTS / 10))
# The 64k sequential job writes N/4 * 64 KiB = N * 16 KiB; the volume holds it with room
# (and at least 64 MiB, so the 4k random jobs spread over 16384 blocks).
SIZE_MIB=$(((REQUESTS * 16 / 1024) * 5 / 4 + 1))
((SIZE_MIB < 64)) && SIZE_MIB=64
SIZE_BYTES=$((SIZE_MIB * 1048576))

# ---------------------------------------------------------------------------------------
# Scratch space and cleanup: everything started is recorded by pid and stopped on exit.

mkdir -p "$TMP_PARENT" || die "cannot create --tmpdir $TMP_PARENT"
WORK=$(mktemp -d "$TMP_PARENT/tether-callgrind.XXXXXX") || die "mktemp in $TMP_PARENT failed"
WORK=$(cd "$WORK" && pwd)
[[ $(stat -f -c %T "$WORK") == tmpfs ]] && warn "$WORK is on tmpfs; use --tmpdir on a real disk"
if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP" || die "cannot create --keep $KEEP"
    KEEP=$(cd "$KEEP" && pwd)
fi

PIDS=()
CLEANED=0

# Stop one process: $1 pid, $2 signal, $3 seconds of grace before SIGKILL. Returns 1 if it
# had to be killed (then callgrind wrote nothing).
stop_pid() {
    local pid=$1 sig=$2 grace=$3 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -"$sig" "$pid" 2>/dev/null
    for ((i = 0; i < grace * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return 1
    fi
    wait "$pid" 2>/dev/null
    return 0
}

# shellcheck disable=SC2317  # only reached through the traps
cleanup() {
    ((CLEANED)) && return
    CLEANED=1
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid" TERM 5; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'warn "interrupted"; cleanup; exit 130' INT
trap 'warn "terminated"; cleanup; exit 143' TERM

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

# $1 port, $2 pid to watch, $3 log, $4 label, $5 NBD uri (empty: TCP connect is enough)
wait_ready() {
    local port=$1 pid=$2 logf=$3 what=$4 uri=${5:-} deadline=$((SECONDS + START_TIMEOUT)) got
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            warn "$what exited before serving on port $port; last log lines:"
            tail -n 20 "$logf" >&2
            return 1
        fi
        if tcp_open "$port"; then
            [[ -z $uri || $HAVE_NBDINFO == 0 ]] && return 0
            if got=$(nbdinfo --size "$uri" 2>>"$logf"); then
                [[ $got == "$SIZE_BYTES" ]] && return 0
                warn "$what serves $uri with size $got, expected $SIZE_BYTES"
                return 1
            fi
        fi
        sleep 0.5
    done
    warn "$what did not serve on port $port within ${START_TIMEOUT}s; last log lines:"
    tail -n 20 "$logf" >&2
    return 1
}

# The fio job file: $1 uri, $2 requests (4k writes, 4k reads; 64k writes are a quarter).
write_jobfile() {
    local uri=$1 n=$2
    cat <<EOF
[global]
ioengine=nbd
uri=$uri
size=$SIZE_BYTES
direct=1
iodepth=1
randrepeat=1
randseed=20240601
stonewall

[w4k-rand]
rw=randwrite
bs=4k
number_ios=$n
fsync=32

[r4k-rand]
rw=randread
bs=4k
number_ios=$n

[w64k-seq]
rw=write
bs=64k
number_ios=$((n / 4))
fsync=32
EOF
}

# The allocator is the main source of run-to-run noise, because its state depends on the
# order in which threads happen to run:
# - one malloc arena: with one per thread (glibc's default), whether a growing buffer can
#   be realloc'ed in place or must be copied depended on which thread allocated first; that
#   alone moved the replica's count by up to 2.5% (memcpy under BytesMut::reserve in the
#   gRPC decoder);
# - no fastbins (tcache still serves small blocks): malloc_consolidate then ran more or
#   less often from run to run (+-0.3% of the engine's count).
# Both binaries run with the same settings; the per-request totals move by < 0.1%.
MALLOC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mxfast=0
VG=(env "GLIBC_TUNABLES=$MALLOC_TUNABLES" valgrind --tool=callgrind --separate-threads=no)

# Sum the "summary:" lines of the callgrind outputs matching a glob; empty if none.
sum_ir() {
    local f total=0 found=0 v
    for f in "$@"; do
        [[ -f $f ]] || continue
        v=$(awk '/^summary:/{print $2; exit}' "$f")
        [[ $v =~ ^[0-9]+$ ]] || continue
        total=$((total + v)); found=1
    done
    ((found)) && echo "$total"
}

# One measured run. $1 binary, $2 tag, $3 requests. Sets RUN_RESULT to
# "engine_ir replica_ir requests". Runs in this shell (not in $(...)), so the exit trap
# knows the pids it starts.
run_one() {
    local bin=$1 tag=$2 n=$3 dir ports rport nport rpid epid fpid uri rc=0 e r q
    dir=$WORK/$tag
    mkdir -p "$dir/r1"
    read -r -a ports <<<"$(free_ports 2)"
    rport=${ports[0]}; nport=${ports[1]}
    log "$tag: $bin, $n requests per 4k job"

    local replica=dir:$dir/r1
    rpid=
    if ((LOCAL == 0)); then
        "${VG[@]}" --callgrind-out-file="$dir/replica.%p.cg" \
            "$bin" replica --listen "127.0.0.1:$rport" --data "$dir/r1" >"$dir/replica.log" 2>&1 &
        rpid=$!; PIDS+=("$rpid")
        wait_ready "$rport" "$rpid" "$dir/replica.log" "replica ($tag)" || return 1
        replica=127.0.0.1:$rport
    fi

    "${VG[@]}" --callgrind-out-file="$dir/engine.%p.cg" \
        "$bin" engine --volume bench --size "$SIZE_BYTES" --replica "$replica" \
        --nbd-listen "127.0.0.1:$nport" --control-socket "$dir/bench.sock" >"$dir/engine.log" 2>&1 &
    epid=$!; PIDS+=("$epid")
    uri=nbd://127.0.0.1:$nport/bench
    wait_ready "$nport" "$epid" "$dir/engine.log" "engine ($tag)" "$uri" || return 1

    write_jobfile "$uri" "$n" >"$dir/mix.fio"
    # In the background and waited for, so an INT/TERM trap fires at once, not after fio.
    timeout --kill-after=10 $((n / 2 + 300)) fio "$dir/mix.fio" --output-format=json \
        --output="$dir/fio.json" >"$dir/fio.log" 2>&1 &
    fpid=$!; PIDS+=("$fpid")
    wait "$fpid" || { warn "$tag: fio failed:"; tail -n 20 "$dir/fio.log" >&2; rc=1; }

    # The engine first (its replica stream closes cleanly), then the replica.
    stop_pid "$epid" TERM "$STOP_TIMEOUT" || { warn "$tag: engine ignored SIGTERM for ${STOP_TIMEOUT}s, killed"; rc=1; }
    if [[ -n $rpid ]]; then
        stop_pid "$rpid" TERM "$STOP_TIMEOUT" || { warn "$tag: replica ignored SIGTERM for ${STOP_TIMEOUT}s, killed"; rc=1; }
    fi
    PIDS=()
    [[ -n $KEEP ]] && { mkdir -p "$KEEP/$tag"; cp "$dir"/*.cg "$dir"/*.log "$dir"/*.fio "$dir"/fio.json "$KEEP/$tag/" 2>/dev/null; }
    ((rc == 0)) || return 1

    e=$(sum_ir "$dir"/engine.*.cg)  || true
    r=$(sum_ir "$dir"/replica.*.cg) || true
    ((LOCAL)) && r=0
    [[ -n $e && -n $r ]] || { warn "$tag: callgrind wrote no summary (engine '${e}', replica '${r}')"; return 1; }
    q=$(python3 - "$dir/fio.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(j["read"]["total_ios"] + j["write"]["total_ios"] + j.get("sync", {}).get("total_ios", 0)
          for j in d["jobs"]))
EOF
) || { warn "$tag: cannot read fio.json"; return 1; }
    rm -rf "$dir"
    RUN_RESULT="$e $r $q"
}

# ---------------------------------------------------------------------------------------

BINS=("$TETHER"); LABELS=(new)
[[ -n $TETHER_PREV ]] && { BINS+=("$TETHER_PREV"); LABELS+=(prev); }

log "volume ${SIZE_MIB} MiB; runs of $REQUESTS and $SMALL requests per 4k job; $ROUNDS round(s); scratch $WORK"
RESULTS=$WORK/results.txt
: >"$RESULTS"
for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate which binary goes first, so neither always runs on a warmer machine.
    order=(); for i in "${!BINS[@]}"; do order+=("$i"); done
    ((round % 2 == 0)) && order=($(printf '%s\n' "${order[@]}" | tac))
    for i in "${order[@]}"; do
        run_one "${BINS[i]}" "${LABELS[i]}-r$round-big" "$REQUESTS" || die "run ${LABELS[i]} round $round ($REQUESTS requests) failed"
        big=$RUN_RESULT
        run_one "${BINS[i]}" "${LABELS[i]}-r$round-small" "$SMALL" || die "run ${LABELS[i]} round $round ($SMALL requests) failed"
        small=$RUN_RESULT
        echo "${LABELS[i]} $round $big $small" >>"$RESULTS"
        log "${LABELS[i]} round $round: engine/replica/requests  big: $big  small: $small"
    done
done
[[ -n $KEEP ]] && cp "$RESULTS" "$KEEP/"

SETUP="$(valgrind --version), GLIBC_TUNABLES=$MALLOC_TUNABLES, volume ${SIZE_MIB} MiB, $ROUNDS round(s): median (min-max)."
python3 - "$RESULTS" "$TETHER" "${TETHER_PREV:-}" "$REQUESTS" "$SMALL" "$SETUP" <<'EOF'
import statistics, sys
path, new_bin, prev_bin, n, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
rows = {}
for line in open(path):
    label, rnd, e1, r1, q1, e0, r0, q0 = line.split()
    e1, r1, q1, e0, r0, q0 = map(int, (e1, r1, q1, e0, r0, q0))
    dq = q1 - q0
    rows.setdefault(label, []).append(((e1 - e0) / dq, (r1 - r0) / dq, (e1 + r1 - e0 - r0) / dq, e1, r1, q1, q0))

def cell(vals):
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:,.0f}"
    return f"{m:,.0f} ({min(vals):,.0f}-{max(vals):,.0f})"

bins = {"new": new_bin, "prev": prev_bin}
print()
print(f"Marginal instructions (callgrind Ir) per NBD request: runs of {n} and {small} requests "
      "per 4k job; requests = fio reads + writes + flushes. " + sys.argv[6])
print()
print("| binary | engine Ir/req | replica Ir/req | total Ir/req | engine Ir (big run) | replica Ir (big run) | requests (big/small) |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label in ("new", "prev"):
    if label not in rows:
        continue
    rs = rows[label]
    print(f"| {label}: `{bins[label]}` | {cell([x[0] for x in rs])} | {cell([x[1] for x in rs])} | "
          f"{cell([x[2] for x in rs])} | {statistics.median(x[3] for x in rs):,.0f} | "
          f"{statistics.median(x[4] for x in rs):,.0f} | {rs[0][5]}/{rs[0][6]} |")
if "prev" in rows:
    print()
    for i, what in ((0, "engine"), (1, "replica"), (2, "total")):
        a = statistics.median(x[i] for x in rows["new"])
        b = statistics.median(x[i] for x in rows["prev"])
        if b == 0:
            continue  # --local: no replica daemon
        print(f"- new/prev {what}: {a / b:.4f} ({(a / b - 1) * 100:+.2f}%)")
EOF
