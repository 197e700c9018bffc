#!/usr/bin/env bash
# Garbage collection over a long history (issue 18), beside restic prune, in one run:
#   - a volume (default 4 GiB, 1 replica) half random data in 1 MiB pieces, half zero;
#   - BACKUPS backups (default 100), with 1 % of the volume changed in 1 MiB-aligned
#     regions before each; tether backs the volume up to a directory target;
#   - restic gets the same data and the same changes as a directory of 1 MiB files
#     (one per MiB of the volume), so it reads only what changed, as tether does;
#   - then the oldest half is deleted: `tether backup rm` each, `restic forget
#     --keep-last N/2`; and the garbage collected: `tether backup gc --grace 0s`,
#     `restic prune`. Both under /usr/bin/time: seconds and peak memory (max RSS).
#
# Usage: benches/gc.sh [--tether BIN] [--size-gib N] [--backups N]
# Needs: restic, s3s-fs not needed, /usr/bin/time, python3 with the nbd module.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TETHER=$REPO/target/release/tether
GIB=4
BACKUPS=100
while [[ $# -gt 0 ]]; do
    case $1 in
        --tether) TETHER=$2; shift 2 ;;
        --size-gib) GIB=$2; shift 2 ;;
        --backups) BACKUPS=$2; shift 2 ;;
        *) sed -n '/^# Usage:/,/^# Needs:/p' "$0" >&2; exit 2 ;;
    esac
done
for t in restic /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-gc-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${KEEP:-} ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export TETHER_RUN_DIR=$WORK/run
export RESTIC_PASSWORD="benchmark passphrase"
MIB=$((GIB * 1024))
head -c 64 /dev/urandom >"$WORK/key"
T="--target $WORK/dir --backup-key-file $WORK/key"

read -r P1 P2 _ _ < <(ports)
"$TETHER" replica --listen 127.0.0.1:$P1 --data "$WORK/r1" >"$WORK/r1.log" 2>&1 & PIDS+=($!)
sleep 0.5
"$TETHER" engine --volume gc --size "${GIB}G" --replica 127.0.0.1:$P1 --nbd-listen 127.0.0.1:$P2 \
    >"$WORK/engine.log" 2>&1 & PIDS+=($!)
URI=nbd://127.0.0.1:$P2/gc
for _ in $(seq 100); do "$TETHER" volume status gc >/dev/null 2>&1 && break; sleep 0.1; done
mkdir -p "$WORK/files"
restic init --repo "$WORK/restic" -q >/dev/null
# A short lease: the history here is minutes old, while in use the backups
# retention removes are days old and their leases long expired. A removed backup
# whose lease is live keeps its chunks (docs/backup.md).
"$TETHER" backup target init $T --lease-time 5s >/dev/null

# Writes the same 1 MiB pieces to the volume and to the files restic backs up:
# round 0 fills half the volume, every later round changes 1 % of it.
write() { /usr/bin/python3 - "$URI" "$MIB" "$WORK/files" "$1" <<'EOF'
import os, random, sys, nbd
uri, mib, files, rnd = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(1000 + rnd)
pieces = rng.sample(range(mib), mib // 2 if rnd == 0 else max(1, mib // 100))
for p in pieces:
    b = rng.randbytes(1 << 20)
    h.pwrite(b, p << 20)
    with open(os.path.join(files, "%06d" % p), "wb") as f:
        f.write(b)
h.flush(); h.shutdown()
EOF
}
now() { date +%s.%N; }
TB=0; RB=0
for i in $(seq 0 $((BACKUPS - 1))); do
    write "$i"
    t0=$(now); "$TETHER" backup create gc $T >/dev/null; t1=$(now)
    TB=$(python3 -c "print($TB + $t1 - $t0)")
    t0=$(now); restic backup --repo "$WORK/restic" -q "$WORK/files" >/dev/null; t1=$(now)
    RB=$(python3 -c "print($RB + $t1 - $t0)")
done
TSIZE0=$(du -sm "$WORK/dir" | cut -f1); RSIZE0=$(du -sm "$WORK/restic" | cut -f1)
# The oldest half goes.
KEEP_N=$((BACKUPS / 2))
"$TETHER" backup ls gc $T --json | python3 -c "
import json,sys; [print(b['volume'] + '/' + b['id']) for b in json.load(sys.stdin)[:$KEEP_N]]" |
    while read -r b; do "$TETHER" backup rm "$b" $T >/dev/null; done
restic forget --repo "$WORK/restic" -q --keep-last "$KEEP_N" >/dev/null
sleep 6
measure() { # prints "seconds max_rss_MiB" of the command
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>&1
    read -r s k <"$WORK/time"
    echo "$s $((k / 1024))"
}
read -r TGC TMEM < <(measure "$TETHER" backup gc $T --grace 0s)
TREPORT=$(tr -s ' ' <"$WORK/out" | paste -sd ' ')
read -r RGC RMEM < <(measure restic prune --repo "$WORK/restic" -q)
TSIZE1=$(du -sm "$WORK/dir" | cut -f1); RSIZE1=$(du -sm "$WORK/restic" | cut -f1)
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
cat <<EOF
gc benchmark: ${GIB} GiB volume (half random), $BACKUPS backups with 1 % changed before each, oldest $KEEP_N removed; $(nproc) cores, $(date -u +%F)
| | tether | restic | tether / restic |
| --- | --- | --- | --- |
| $BACKUPS backups, total | $(printf %.1f "$TB") s | $(printf %.1f "$RB") s | $(ratio "$TB" "$RB") |
| stored before gc | $TSIZE0 MiB | $RSIZE0 MiB | |
| gc / prune | $TGC s | $RGC s | $(ratio "$TGC" "$RGC") |
| peak memory of gc / prune | $TMEM MiB | $RMEM MiB | $(ratio "$TMEM" "$RMEM") |
| stored after | $TSIZE1 MiB | $RSIZE1 MiB | |
tether gc said: $TREPORT
EOF
