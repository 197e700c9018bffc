#!/usr/bin/env bash
# Rebuild speed (issue 15), each number from one run on this machine:
#   thin: a 1 TiB thin volume holding 256 MiB of scattered 4 KiB writes (fio, random
#         offsets over the whole volume); seconds until a new replica added with
#         `tether replica add` is healthy.
#   full: a 4 GiB volume written end to end; the rebuild of a new replica in MiB/s,
#         idle and under a 4 KiB random-write load (fio, queue depth 16), the load's
#         IOPS during the rebuild as a fraction of its IOPS without one, and the
#         disk's own sequential write throughput from the same run (fio on a file).
#   return: a 4 GiB volume written end to end; one of its three replicas is killed,
#         1 % of the volume (41 MiB in 1 MiB writes at random offsets) changes, and
#         the replica restarts: seconds until it is healthy again, and the blocks the
#         rebuild compared and copied (not part of `all`).
#
# Usage: benches/rebuild.sh [--tether BIN] [thin|full|return|all]
# Needs: fio with the nbd engine, nbdinfo, python3.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TETHER=$REPO/target/release/tether
WHAT=all
while [[ $# -gt 0 ]]; do
    case $1 in
        --tether) TETHER=$2; shift 2 ;;
        thin|full|return|all) WHAT=$1; shift ;;
        *) sed -n '/^# Usage:/,/^# Needs:/p' "$0" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-rebuild.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${KEEP:-} ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


# Starts two replicas and an engine for a volume of $2 that wants three replicas;
# sets P (ports: nbd, r1, r2, r3) and URI.
start() {   # $1 dir, $2 size
    local dir=$1 i args=()
    read -r -a P <<<"$(ports)"
    for i in 1 2; do
        mkdir -p "$dir/r$i"
        "$TETHER" replica --listen "127.0.0.1:${P[i]}" --data "$dir/r$i" >"$dir/r$i.log" 2>&1 &
        PIDS+=($!)
        args+=(--replica "127.0.0.1:${P[i]}")
    done
    sleep 0.5
    "$TETHER" engine --volume bench --size "$2" "${args[@]}" --replicas 3 \
        --nbd-listen "127.0.0.1:${P[0]}" --control-socket "$dir/c.sock" >"$dir/engine.log" 2>&1 &
    PIDS+=($!)
    URI="nbd://127.0.0.1:${P[0]}/bench"
    for _ in $(seq 150); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.2; done
}

# Adds a third replica and waits until it is healthy; prints the seconds it took.
add_and_wait() {   # $1 dir
    local dir=$1
    mkdir -p "$dir/r3"
    "$TETHER" replica --listen "127.0.0.1:${P[3]}" --data "$dir/r3" >"$dir/r3.log" 2>&1 &
    PIDS+=($!)
    sleep 0.5
    local t0 t1
    t0=$(date +%s.%N)
    "$TETHER" replica add bench "127.0.0.1:${P[3]}" --control-socket "$dir/c.sock" >/dev/null
    wait_healthy "$dir"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}

# Waits until all three replicas are healthy.
wait_healthy() {   # $1 dir
    while ! "$TETHER" volume status bench --json --control-socket "$1/c.sock" 2>/dev/null |
        python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if sum(r["state"]=="healthy" for r in s["replicas"])==3 else 1)'; do
        sleep 0.1
    done
}

iops() {   # $1 fio json (a fio stopped by a signal prints a line before it)
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' "$1"
}

# Stops everything started and frees the phase's space (4 GiB volumes add up).
stop() {   # $1 dir
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; PIDS=(); wait 2>/dev/null || true
    [[ -n ${KEEP:-} ]] || rm -rf "$1"
}

if [[ $WHAT == thin || $WHAT == all ]]; then
    d=$WORK/thin; mkdir -p "$d"
    start "$d" 1t
    fio --name=scatter --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 \
        --size=1t --io_size=256m --norandommap --randrepeat=0 >/dev/null
    secs=$(add_and_wait "$d")
    copied=$(grep -o 'copied=[0-9]*' "$d/engine.log" | tail -1 | cut -d= -f2)
    echo "thin: 1 TiB volume, 256 MiB of scattered 4 KiB writes: new replica healthy in $secs s (copied $((copied >> 20)) MiB)"
    stop "$d"
fi

if [[ $WHAT == full || $WHAT == all ]]; then
    d=$WORK/disk; mkdir -p "$d"
    fio --name=disk --filename="$d/f" --rw=write --bs=1m --size=4g --direct=0 --end_fsync=1 \
        --output-format=json --output="$d/fio.json" >/dev/null
    disk=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["bw"]/1024))' "$d/fio.json")
    rm -f "$d/f"
    echo "disk: sequential write $disk MiB/s (fio, 1 MiB, buffered, fsync at the end)"

    d=$WORK/idle; mkdir -p "$d"
    start "$d" 4g
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size=4g >/dev/null
    secs=$(add_and_wait "$d")
    echo "full, idle: 4 GiB rebuilt in $secs s: $(python3 -c "print(round(4096 / $secs))") MiB/s"
    stop "$d"

    d=$WORK/load; mkdir -p "$d"
    start "$d" 4g
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size=4g >/dev/null
    fio --name=base --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --size=4g \
        --time_based --runtime=15 --output-format=json --output="$d/base.json" >/dev/null
    fio --name=load --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --size=4g \
        --time_based --runtime=600 --output-format=json --output="$d/load.json" >/dev/null &
    FIO=$!
    sleep 3
    secs=$(add_and_wait "$d")
    kill -INT "$FIO"; wait "$FIO" 2>/dev/null || true
    base=$(iops "$d/base.json"); during=$(iops "$d/load.json")
    echo "full, under load: 4 GiB rebuilt in $secs s: $(python3 -c "print(round(4096 / $secs))") MiB/s; 4 KiB random writes: $base IOPS before, $during during ($(python3 -c "print(f'{$during / $base:.2f}')")x)"
    stop "$d"
fi

if [[ $WHAT == return ]]; then
    d=$WORK/return; mkdir -p "$d"
    start "$d" 4g
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size=4g \
        --end_fsync=1 >/dev/null
    add_and_wait "$d" >/dev/null
    # A flush after the rebuild: without one the engine cannot tell what the new
    # replica made durable, and its record would start with the whole volume.
    fio --name=flush --ioengine=nbd --uri="$URI" --rw=write --bs=4k --size=4k --end_fsync=1 >/dev/null
    pkill -9 -f -- "--data $d/r3" || true
    sleep 0.5
    fio --name=change --ioengine=nbd --uri="$URI" --rw=randwrite --bs=1m --iodepth=8 --size=4g \
        --io_size=41m --randrepeat=0 --end_fsync=1 >/dev/null
    t0=$(date +%s.%N)
    "$TETHER" replica --listen "127.0.0.1:${P[3]}" --data "$d/r3" >>"$d/r3.log" 2>&1 &
    PIDS+=($!)
    wait_healthy "$d"
    t1=$(date +%s.%N)
    last=$(grep 'rebuild finished' "$d/engine.log" | tail -1 || true)
    compared=$(grep -o 'compared=[0-9]*' <<<"$last" | cut -d= -f2 || true)
    copied=$(grep -o 'copied=[0-9]*' <<<"$last" | cut -d= -f2 || true)
    echo "return: 4 GiB volume, 1 % changed while a replica was away: healthy again in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s (compared ${compared:-?} blocks, copied $(( ${copied:-0} >> 20 )) MiB)"
    pkill -9 -f -- "--data $d/r3" || true
    stop "$d"
fi
