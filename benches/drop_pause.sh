#!/usr/bin/env bash
# The pause a replica drop causes, on a 3-replica volume: one writer (fio, 4k random
# writes, queue depth 1) runs while a replica is frozen with SIGSTOP. The write that
# was in flight waits --timeout for the frozen replica, then the engine drops it (and,
# since membership generations, records the drop on a majority) and acknowledges. So:
#   pause = (the longest write's completion latency) - timeout
# is the time from the failed replica's timeout to that write's acknowledgement,
# generation write included. From the engine's log it also reports the time from
# "replica dropped" to "membership generation counts" (the generation write alone).
#
# Usage: benches/drop_pause.sh [--tether BIN] [--tether-prev BIN] [--rounds N] [--timeout S]
# Needs: fio with the nbd engine, python3, nbdinfo.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TETHER=$REPO/target/release/tether
PREV=
ROUNDS=3
TIMEOUT=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --tether) TETHER=$2; shift 2 ;;
        --tether-prev) PREV=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        *) sed -n '/^# Usage:/,/^# Needs:/p' "$0" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-drop.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


# One measurement: prints "max_latency_ms pause_ms generation_ms" (generation_ms is
# "-" when the engine logs no generation).
measure() {   # $1 binary, $2 dir
    local bin=$1 dir=$2 p args=() i
    read -r -a p <<<"$(ports)"
    for i in 1 2 3; do
        mkdir -p "$dir/r$i"
        "$bin" replica --listen "127.0.0.1:${p[i]}" --data "$dir/r$i" >"$dir/r$i.log" 2>&1 &
        PIDS+=($!); eval "R$i=$!"
        args+=(--replica "127.0.0.1:${p[i]}")
    done
    sleep 0.5
    "$bin" engine --volume bench --size 1g "${args[@]}" --timeout "$TIMEOUT" \
        --nbd-listen "127.0.0.1:${p[0]}" --control-socket "$dir/c.sock" >"$dir/engine.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 150); do nbdinfo --size "nbd://127.0.0.1:${p[0]}/bench" >/dev/null 2>&1 && break; sleep 0.2; done
    (sleep 4; kill -STOP "$R3") &
    fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:${p[0]}/bench" --rw=randwrite --bs=4k \
        --iodepth=1 --size=256m --time_based --runtime=$((TIMEOUT + 8)) \
        --output-format=json --output="$dir/fio.json" >/dev/null 2>&1
    wait $! 2>/dev/null || true
    python3 - "$dir/fio.json" "$dir/engine.log" "$TIMEOUT" <<'PY'
import json, re, sys
from datetime import datetime
clat = json.load(open(sys.argv[1]))["jobs"][0]["write"]["clat_ns"]["max"] / 1e6
timeout = float(sys.argv[3]) * 1000
def at(line):
    m = re.match(r"\S*?(\d{4}-\d\d-\d\dT[\d:.]+)Z", re.sub(r"\x1b\[[0-9;]*m", "", line))
    return datetime.fromisoformat(m.group(1)) if m else None
dropped = counted = None
for line in open(sys.argv[2]):
    if "replica dropped from the volume" in line and dropped is None:
        dropped = at(line)
    elif "membership generation counts" in line and "drop" in line and dropped and counted is None:
        counted = at(line)
gen = f"{(counted - dropped).total_seconds() * 1000:.1f}" if dropped and counted else "-"
print(f"{clat:.1f} {clat - timeout:.1f} {gen}")
PY
    for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null; kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null || true
    PIDS=()
    rm -rf "$dir"
}

systems=(tether)
[[ -n $PREV ]] && systems+=(tether-prev)
declare -A results
for ((r = 1; r <= ROUNDS; r++)); do
    for s in "${systems[@]}"; do
        bin=$TETHER; [[ $s == tether-prev ]] && bin=$PREV
        out=$(measure "$bin" "$WORK/$s-$r")
        echo "[drop] round $r $s: longest write, pause after the timeout, generation write (ms): $out" >&2
        results[$s]+="$out;"
    done
done
echo "| system | longest write (ms) | pause after the ${TIMEOUT} s timeout (ms) | drop to generation counted (ms) |"
echo "|---|---|---|---|"
for s in "${systems[@]}"; do
    python3 - "$s" "${results[$s]}" <<'PY'
import statistics, sys
rows = [r.split() for r in sys.argv[2].split(";") if r]
def col(i):
    v = [float(r[i]) for r in rows if r[i] != "-"]
    return f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "-"
print(f"| {sys.argv[1]} | {col(0)} | {col(1)} | {col(2)} |")
PY
done
