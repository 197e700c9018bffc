#!/usr/bin/env bash
# Backup and restore speed (issue 17), all in one run on this machine:
#   - a 4 GiB volume (1 replica) holding 50 % random data in 1 MiB pieces at random
#     places and 50 % zeroes;
#   - nbdcopy of the volume to a file: how fast the volume can be read;
#   - tether's full backup to a directory target and to an S3 server that checks
#     signatures (s3s-fs on loopback), and restore from each: into a new volume on a
#     new replica (the empty-cluster case) and into a file;
#   - restic and borg backing up the same image (the nbdcopy copy) to the same disk;
#   - incremental backups after 1 % of the volume changed in 1 MiB-aligned regions,
#     and after 1 % changed in scattered 4 KiB writes: time, bytes uploaded, and the
#     requests the S3 server saw per backup (PUT, GET, LIST, HEAD), from its own log.
# Rates are MiB of volume per second (4096 MiB over the seconds taken), so every
# tool is measured on the same bytes.
#
# Usage: benches/backup.sh [--tether BIN] [--size-gib N] [--chunk-size 1M]
# Needs: nbdcopy, s3s-fs, restic, borg, /usr/bin/python3 with the nbd module.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TETHER=$REPO/target/release/tether
GIB=4
CHUNK=1M
while [[ $# -gt 0 ]]; do
    case $1 in
        --tether) TETHER=$2; shift 2 ;;
        --size-gib) GIB=$2; shift 2 ;;
        --chunk-size) CHUNK=$2; shift 2 ;;
        *) sed -n '/^# Usage:/,/^# Needs:/p' "$0" >&2; exit 2 ;;
    esac
done
for t in nbdcopy s3s-fs restic borg; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-backup-bench.XXXXXX")
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
export TETHER_BACKUP_PASSPHRASE="benchmark passphrase"
export RESTIC_PASSWORD="benchmark passphrase" BORG_PASSPHRASE="benchmark passphrase"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key
MIB=$((GIB * 1024))

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
rate() { python3 -c "print(f'{$MIB / ($2 - $1):.0f}')"; }

read -r P1 P2 P3 P4 < <(ports)
read -r PS _ _ _ < <(ports)
"$TETHER" replica --listen 127.0.0.1:$P1 --data "$WORK/r1" >"$WORK/r1.log" 2>&1 & PIDS+=($!)
"$TETHER" replica --listen 127.0.0.1:$P2 --data "$WORK/r2" >"$WORK/r2.log" 2>&1 & PIDS+=($!)
mkdir -p "$WORK/s3/bucket"
RUST_LOG=s3s::ops=debug NO_COLOR=1 s3s-fs --host 127.0.0.1 --port "$PS" \
    --access-key bench --secret-key bench-secret-key "$WORK/s3" >"$WORK/s3.log" 2>&1 & PIDS+=($!)
sleep 0.5
"$TETHER" engine --volume bk --size "${GIB}G" --replica 127.0.0.1:$P1 --nbd-listen 127.0.0.1:$P3 \
    >"$WORK/engine.log" 2>&1 & PIDS+=($!)
URI=nbd://127.0.0.1:$P3/bk
for _ in $(seq 100); do "$TETHER" volume status bk >/dev/null 2>&1 && break; sleep 0.1; done

# The source image: half random 1 MiB pieces at seeded random places, half holes.
/usr/bin/python3 - "$WORK/src.img" "$MIB" <<'EOF'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(17)
pieces = rng.sample(range(mib), mib // 2)
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for p in sorted(pieces):
        f.seek(p << 20)
        f.write(rng.randbytes(1 << 20))
EOF
nbdcopy "$WORK/src.img" "$URI"
rm -f "$WORK/src.img"
sync

DIR="--target $WORK/dir"
S3="--target s3://bucket/t --s3-endpoint http://127.0.0.1:$PS --s3-path-style"
"$TETHER" backup target init $DIR --chunk-size "$CHUNK" >/dev/null
"$TETHER" backup target init $S3 --chunk-size "$CHUNK" >/dev/null
s3ops() { grep -o 'resolved route, op: [A-Za-z0-9]*' "$WORK/s3.log" | awk '{print $4}' | sed 's/,$//'; }
count_ops() { # ops since line $1 of the op list: PUT GET LIST HEAD
    s3ops | tail -n +$(($1 + 1)) | awk '
        /Put/ {p++} /Get/ {g++} /List/ {l++} /Head/ {h++}
        END {printf "%d PUT, %d GET, %d LIST, %d HEAD", p, g, l, h}'
}
uploaded() { "$TETHER" backup inspect bk $1 --json | python3 -c '
import json,sys; s=json.load(sys.stdin)["stats"]
print("%.1f MiB in %d chunks (%s)" % (s["bytes_uploaded"] / 1048576, s["chunks_uploaded"], s["method"]))'; }

declare -A R
t0=$(now); nbdcopy "$URI" "$WORK/copy.img"; t1=$(now); R[nbdcopy]=$(rate "$t0" "$t1")
sync
t0=$(now); "$TETHER" backup create bk $DIR >/dev/null; t1=$(now)
R[full_dir]=$(rate "$t0" "$t1"); R[full_dir_s]=$(secs "$t0" "$t1"); R[full_dir_up]=$(uploaded "$DIR")
n=$(s3ops | wc -l)
t0=$(now); "$TETHER" backup create bk $S3 >/dev/null; t1=$(now)
R[full_s3]=$(rate "$t0" "$t1"); R[full_s3_ops]=$(count_ops "$n")

restic init --repo "$WORK/restic" -q >/dev/null
t0=$(now); restic backup --repo "$WORK/restic" -q "$WORK/copy.img" >/dev/null; t1=$(now)
R[restic]=$(rate "$t0" "$t1")
borg init --encryption=repokey "$WORK/borg" >/dev/null 2>&1
t0=$(now); borg create "$WORK/borg::a" "$WORK/copy.img"; t1=$(now)
R[borg]=$(rate "$t0" "$t1")
R[restic_size]=$(du -sm "$WORK/restic" | cut -f1); R[borg_size]=$(du -sm "$WORK/borg" | cut -f1)
R[dir_size]=$(du -sm "$WORK/dir" | cut -f1)
rm -f "$WORK/copy.img"

# Restores: into a new volume on a new replica (nothing else of it exists), and to files.
t0=$(now); "$TETHER" backup restore bk $DIR --volume dr --replica 127.0.0.1:$P2 --control-socket "$WORK/none.sock" >/dev/null 2>&1; t1=$(now)
R[restore_volume]=$(rate "$t0" "$t1"); R[restore_volume_s]=$(secs "$t0" "$t1")
t0=$(now); "$TETHER" backup restore bk $DIR --to-file "$WORK/r-dir.img" >/dev/null 2>&1; t1=$(now)
R[restore_file_dir]=$(rate "$t0" "$t1"); rm -f "$WORK/r-dir.img"
n=$(s3ops | wc -l)
t0=$(now); "$TETHER" backup restore bk $S3 --to-file "$WORK/r-s3.img" >/dev/null 2>&1; t1=$(now)
R[restore_file_s3]=$(rate "$t0" "$t1"); R[restore_s3_ops]=$(count_ops "$n"); rm -f "$WORK/r-s3.img"
t0=$(now); (cd "$WORK" && restic restore latest --repo "$WORK/restic" --target "$WORK/rr" -q); t1=$(now)
R[restic_restore]=$(rate "$t0" "$t1"); rm -rf "$WORK/rr"

# Incrementals: 1 % in 1 MiB-aligned regions, then 1 % in scattered 4 KiB writes.
change() { /usr/bin/python3 - "$URI" "$MIB" "$1" <<'EOF'
import os, random, sys, nbd
uri, mib, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(99 if how == "regions" else 7)
if how == "regions":
    for p in rng.sample(range(mib), max(1, mib // 100)):
        h.pwrite(os.urandom(1 << 20), p << 20)
else:
    for _ in range((mib << 20) // 100 // 4096):
        h.pwrite(os.urandom(4096), rng.randrange((mib << 20) // 4096) * 4096)
h.flush(); h.shutdown()
EOF
}
for how in regions scattered; do
    change $how
    t0=$(now); "$TETHER" backup create bk $DIR >/dev/null; t1=$(now)
    R[inc_${how}_dir_s]=$(secs "$t0" "$t1"); R[inc_${how}_dir_up]=$(uploaded "$DIR")
    n=$(s3ops | wc -l)
    t0=$(now); "$TETHER" backup create bk $S3 >/dev/null; t1=$(now)
    R[inc_${how}_s3_s]=$(secs "$t0" "$t1"); R[inc_${how}_s3_ops]=$(count_ops "$n")
done

pct() { python3 -c "print(f'{100 * $1 / $2:.1f} %')"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
cat <<EOF
backup benchmark: ${GIB} GiB volume, 50 % random / 50 % zero, $CHUNK chunks, $(nproc) cores, $(date -u +%F)

| what | MiB/s (of volume) | beside |
| --- | --- | --- |
| nbdcopy volume -> file | ${R[nbdcopy]} | |
| tether full backup -> directory | ${R[full_dir]} | $(ratio "${R[full_dir]}" "${R[restic]}") restic, $(ratio "${R[full_dir]}" "${R[nbdcopy]}") nbdcopy |
| tether full backup -> S3 (s3s-fs) | ${R[full_s3]} | $(ratio "${R[full_s3]}" "${R[restic]}") restic |
| restic backup of the image -> directory | ${R[restic]} | |
| borg create of the image -> directory | ${R[borg]} | |
| tether restore -> new volume on an empty replica | ${R[restore_volume]} | ${R[restore_volume_s]} s |
| tether restore -> file, from directory | ${R[restore_file_dir]} | |
| tether restore -> file, from S3 | ${R[restore_file_s3]} | |
| restic restore -> file | ${R[restic_restore]} | |

stored: tether ${R[dir_size]} MiB, restic ${R[restic_size]} MiB, borg ${R[borg_size]} MiB
full backup: ${R[full_dir_s]} s, uploaded ${R[full_dir_up]}; S3 requests: ${R[full_s3_ops]}
S3 requests for a full restore: ${R[restore_s3_ops]}

| incremental after 1 % changed | directory | S3 | of the full backup's time | uploaded | S3 requests |
| --- | --- | --- | --- | --- | --- |
| 1 MiB-aligned regions | ${R[inc_regions_dir_s]} s | ${R[inc_regions_s3_s]} s | $(pct "${R[inc_regions_dir_s]}" "${R[full_dir_s]}") | ${R[inc_regions_dir_up]} | ${R[inc_regions_s3_ops]} |
| scattered 4 KiB writes | ${R[inc_scattered_dir_s]} s | ${R[inc_scattered_s3_s]} s | $(pct "${R[inc_scattered_dir_s]}" "${R[full_dir_s]}") | ${R[inc_scattered_dir_up]} | ${R[inc_scattered_s3_ops]} |
EOF
