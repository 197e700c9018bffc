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
#   --runtime S       seconds measured per run, after the ramp (default 20)
#   --ramp S          seconds run before measuring (default 3). On a VM that hands
#                     freed memory back to its host, a write profile's first pass
#                     over fresh page cache runs at the host's fault rate; a ramp
#                     longer than that pass measures the steady state (RESULTS.md,
#                     seventh session)
#   --size SIZE       volume / file size, e.g. 64m, 1g (default 1g)
#   --profiles LIST   comma-separated, from P1..P6 (default all)
#   --systems LIST    comma-separated, from tether1,tether3,qemu-nbd,nbdkit,nbd-server and
#                     tether1-enc (encrypted), tether3-sec (3 replicas, encrypted, mutual
#                     TLS to the daemons: what `tether up` runs). In these the first replica
#                     is served in the engine's own process (--replica dir:PATH), as an
#                     engine placed beside one of its replicas runs. With every replica a
#                     daemon over TCP: tether1-net, tether3-net, tether1-tls (mutual TLS),
#                     tether3-sec-net. tether3-grpc and tether3-sec-grpc: as tether3 and
#                     tether3-sec, their I/O streams on gRPC instead of the daemons' data
#                     ports. (default: tether1,tether3,qemu-nbd,nbdkit,nbd-server)
#   --tether BIN      tether binary (default target/release/tether, relative to the repo)
#   --tether-prev BIN an older tether binary, run as the systems tether1-prev and
#                     tether3-prev (every replica a daemon, as tether1-net and tether3-net),
#                     tether1-enc-prev and tether3-sec-prev (placed as tether1-enc and
#                     tether3-sec), to compare builds in one run
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
ALL_SYSTEMS=(tether1 tether3 qemu-nbd nbdkit nbd-server tether1-enc tether3-sec tether1-net tether3-net tether1-tls tether3-sec-net tether3-grpc tether3-sec-grpc tether1-prev tether3-prev tether1-enc-prev tether3-sec-prev)
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
        --ramp)          RAMP=$2; shift 2 ;;
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
[[ $RAMP =~ ^[0-9]+$ ]]               || die "--ramp must be a whole number of seconds"
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

# shellcheck source=benches/servers.sh
source "$SCRIPT_DIR/servers.sh"

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
    echo "- order: for each round, for each profile (${PROFILE_LIST[*]}), systems in the order ${RUN_SYSTEMS[*]} (reversed in even rounds); every run starts its server fresh on a fresh backing store and stops it afterwards; P3/P5 first fill the whole volume (fio --rw=write --bs=1M --iodepth=8) on the same server instance"
    echo "- qemu-nbd: -f raw -t --cache=none --aio=$QEMU_AIO --shared=8; nbdkit: file plugin; nbd-server: config with flush = true (daemonized, see run.sh)"
    for n in "${NOTES[@]}"; do echo "- note: $n"; done
} >"$RESULTS/meta.md"
cat "$RESULTS/meta.md" >&2
echo >&2

# ---------------------------------------------------------------------------------------
# The alternation: round -> profile -> system.

# Every other round runs the systems in reverse: a run inherits the memory the one
# before it freed (page cache not yet handed back to the host starts fast), so a fixed
# order would favour whoever always follows a big writer.
for ((round = 1; round <= ROUNDS; round++)); do
    order=("${RUN_SYSTEMS[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((i = ${#RUN_SYSTEMS[@]} - 1; i >= 0; i--)); do order+=("${RUN_SYSTEMS[i]}"); done
    fi
    for profile in "${PROFILE_LIST[@]}"; do
        for system in "${order[@]}"; do
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
