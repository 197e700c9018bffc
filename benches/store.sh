#!/usr/bin/env bash
# Store-level measurements the fio table does not show (issue 3):
#  - reading through a chain of 10 snapshots vs. a volume without snapshots (P3, P5),
#    on two volumes that saw the same writes, alternating, --rounds times;
#  - write amplification: bytes the replica process wrote to storage per byte the
#    client wrote (random 4k and sequential 1M), from /proc/PID/io;
#  - replica memory (RSS) per GiB of written volume, with and without snapshots.
#
# Usage: benches/store.sh [--tether BIN] [--size 1g] [--rounds 3] [--runtime 10]
set -uo pipefail
cd "$(dirname "$0")/.."
TETHER=target/release/tether SIZE=1g ROUNDS=3 RUNTIME=10
while (($#)); do
    case $1 in
        --tether) TETHER=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-store.XXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME: one replica + engine; sets RPID_NAME, EPID_NAME, URI_NAME, SOCK_NAME
start() {
    local n=$1 rp ep
    rp=$(port); ep=$(port)
    "$TETHER" replica --listen 127.0.0.1:$rp --data "$WORK/$n" 2>"$WORK/$n-replica.log" &
    PIDS+=($!); eval "RPID_$n=$!"
    sleep 0.3
    "$TETHER" engine --volume $n --size "$SIZE" --replica 127.0.0.1:$rp --nbd-listen 127.0.0.1:$ep \
        --control-socket "$WORK/$n.sock" 2>"$WORK/$n-engine.log" &
    PIDS+=($!); eval "EPID_$n=$!"
    eval "URI_$n=nbd://127.0.0.1:$ep/$n SOCK_$n=$WORK/$n.sock"
    for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$ep/$n" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "engine for $n did not start" >&2; exit 1
}

fio_run() { # uri rw bs depth extra... -> prints IOPS or MiB/s
    local uri=$1 rw=$2 bs=$3 qd=$4; shift 4
    fio --name=x --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd --size="$SIZE" \
        --output-format=json --output="$WORK/fio.json" "$@" >/dev/null 2>&1
    python3 - "$WORK/fio.json" "$rw" "$bs" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
k = "read" if "read" in sys.argv[2] else "write"
print(round(j[k]["iops"]) if sys.argv[3] == "4k" else round(j[k]["bw"] / 1024))
EOF
}

rss_kib() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
wbytes() { awk '/^write_bytes/ {print $2}' /proc/$1/io; }

echo "# tether store measurements"
echo
echo "- date: $(date -u '+%F %T UTC'); $(nproc) CPUs; kernel $(uname -r)"
echo "- command: \`benches/store.sh $*\` (size $SIZE, rounds $ROUNDS, runtime ${RUNTIME}s)"
echo

start plain
start chain
for v in plain chain; do eval "fio_run \$URI_$v write 1M 8 >/dev/null"; done
for i in $(seq 1 10); do
    for v in plain chain; do
        eval "fio_run \$URI_$v randwrite 4k 16 --io_size=$((${SIZE%g} * 1024 / 10))m --randseed=$i >/dev/null"
    done
    "$TETHER" snapshot create chain "s$i" --control-socket "$WORK/chain.sock" >/dev/null
done
declare -A R
for r in $(seq 1 "$ROUNDS"); do
    for p in P3 P5; do
        for v in plain chain; do
            uri=$(eval echo \$URI_$v)
            if [ $p = P3 ]; then x=$(fio_run "$uri" randread 4k 32 --time_based --runtime=$RUNTIME --ramp_time=3 --direct=1)
            else x=$(fio_run "$uri" read 1M 8 --time_based --runtime=$RUNTIME --ramp_time=3 --direct=1); fi
            R[$p,$v]+="$x "
        done
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "## Reading through 10 snapshots"
echo
echo "| profile | no snapshots | 10 snapshots | chain / plain |"
echo "| --- | --- | --- | --- |"
for p in P3 P5; do
    a=$(echo "${R[$p,plain]}" | median); b=$(echo "${R[$p,chain]}" | median)
    u=IOPS; [ $p = P5 ] && u=MiB/s
    echo "| $p ($u) | $a (${R[$p,plain]% }) | $b (${R[$p,chain]% }) | $(python3 -c "print(f'{$b/$a:.2f}×')") |"
done
echo
echo "## Replica memory"
echo
echo "- 1 volume of $SIZE, fully written, no snapshots: $(( $(rss_kib $RPID_plain) / 1024 )) MiB RSS"
echo "- 1 volume of $SIZE, fully written, 10 snapshots each rewriting 10 %: $(( $(rss_kib $RPID_chain) / 1024 )) MiB RSS"
echo

start wa
w0=$(wbytes $RPID_wa)
fio_run "$URI_wa" randwrite 4k 32 --io_size=256m >/dev/null
kill -TERM $EPID_wa; wait $EPID_wa 2>/dev/null   # clean close: checkpoint into the layer
sync; sleep 1
w1=$(wbytes $RPID_wa)
echo "## Write amplification"
echo
echo "- random 4k, 256 MiB written by the client, then a clean close (checkpoint): $(python3 -c "print(f'{($w1-$w0)/(256<<20):.2f}')") bytes written by the replica per client byte"
