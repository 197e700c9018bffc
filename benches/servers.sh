# Starting and stopping the servers the benchmarks compare (sourced by run.sh and
# pgbench.sh, not run). start_system SYSTEM DIR starts one system with its data under
# DIR and sets URI; stop_servers stops everything started.
#
# The caller sets: TETHER (binary), TETHER_PREV (optional), SIZE (as typed) and
# SIZE_BYTES, START_TIMEOUT (seconds), HAVE_NBDINFO (0/1), PIDS=() and PIDFILES=(),
# and defines warn.

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

# $1 dir, $2 number of replicas, $3 "enc", "tls" or "enc,tls" (optional), $4 binary,
# $5 "local": the first replica is served in the engine's process (dir:PATH, as an engine
# placed beside one of its replicas runs), the others by daemons; "net": all by daemons.
# $6 "grpc": the I/O streams to the daemons stay on gRPC (TETHER_GRPC_IO) instead of
# their data ports, to compare the two in one run.
start_tether() {
    local dir=$1 n=$2 security=${3:-} TETHER=${4:-$TETHER} where=${5:-local} io=${6:-} ports i first=1 rport logf replica_args=() tls_replica=() tls_engine=() enc=() io_env=()
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
    if [[ $where == local ]]; then
        mkdir -p "$dir/r1"
        replica_args+=(--replica "dir:$dir/r1")
        first=2
    fi
    for ((i = first; i <= n; i++)); do
        rport=${ports[i]}
        logf=$dir/replica$i.log
        mkdir -p "$dir/r$i"
        "$TETHER" replica --listen "127.0.0.1:$rport" --data "$dir/r$i" "${tls_replica[@]}" >"$logf" 2>&1 &
        PIDS+=($!)
        wait_tcp "$rport" "$!" "$logf" "tether replica $i" || return 1
        replica_args+=(--replica "127.0.0.1:$rport")
    done
    [[ $io == grpc ]] && io_env=(TETHER_GRPC_IO=1)
    logf=$dir/engine.log
    env "${io_env[@]}" "$TETHER" engine --volume bench --size "$SIZE" "${replica_args[@]}" "${tls_engine[@]}" "${enc[@]}" \
        --nbd-listen "127.0.0.1:${ports[0]}" --control-socket "$dir/bench.sock" ${TETHER_ENGINE_ARGS:-} >"$logf" 2>&1 &
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
        tether1)         start_tether "$2" 1 ;;
        tether3)         start_tether "$2" 3 ;;
        tether1-enc)     start_tether "$2" 1 enc ;;
        tether3-sec)     start_tether "$2" 3 enc,tls ;;
        tether1-net)     start_tether "$2" 1 "" "" net ;;
        tether3-net)     start_tether "$2" 3 "" "" net ;;
        tether1-tls)     start_tether "$2" 1 tls "" net ;;
        tether3-sec-net) start_tether "$2" 3 enc,tls "" net ;;
        tether3-grpc)    start_tether "$2" 3 "" "" local grpc ;;
        tether3-sec-grpc) start_tether "$2" 3 enc,tls "" local grpc ;;
        tether1-prev)    start_tether "$2" 1 "" "$TETHER_PREV" net ;;
        tether3-prev)    start_tether "$2" 3 "" "$TETHER_PREV" net ;;
        tether1-enc-prev) start_tether "$2" 1 enc "$TETHER_PREV" ;;
        tether3-sec-prev) start_tether "$2" 3 enc,tls "$TETHER_PREV" ;;
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

