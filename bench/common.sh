# Shared by the benchmark scripts (sourced, not run): tools, a scratch folder cleaned up on
# exit, the nginx origin, and starting and stopping a server and an agent on loopback.
# The sourcing script sets BULK_MIB (the size of the origin's /bulk) first.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SCRIPT=bench/$(basename "$0")

log() { printf '== %s\n' "$*" >&2; }
die() {
    printf '%s: %s\n' "$SCRIPT" "$*" >&2
    exit 1
}

# ----- tools -----

if ! command -v hey >/dev/null || ! command -v nginx >/dev/null; then
    log "installing hey and nginx from Debian's packages"
    [ "$(id -u)" = 0 ] || die "hey and nginx are missing; install them (apt-get install hey nginx-core)"
    apt-get update -qq
    # policy-rc.d on these machines keeps the packaged nginx service from starting.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey nginx-core >/dev/null
fi
for tool in curl python3 hey nginx awk; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

# ----- scratch folder and cleanup -----

TMP=$(mktemp -d /tmp/fluidity-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

# nginx workers drop to an unprivileged user: the files they serve must be readable.
chmod 755 "$TMP"

# Prints `n` free loopback ports.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Copies the agent and server binaries $1 and $2 to $TMP/bin/$3/, so that a build started
# meanwhile in a shared target directory cannot replace them under a running measurement;
# prints the two copies' paths.
private_copies() {
    mkdir -p "$TMP/bin/$3"
    cp "$1" "$TMP/bin/$3/fluidity"
    cp "$2" "$TMP/bin/$3/fluidity-server"
    echo "$TMP/bin/$3/fluidity $TMP/bin/$3/fluidity-server"
}

# Starts `what` ("$@", with its output in $TMP/$log) and waits until `check` (a command
# string) succeeds; sets STARTED_PID. Returns 1, for another try on other ports, when the
# process exits because its port was taken meanwhile (free ports are only free when
# picked).
start_listening() {
    local what=$1 log=$2 check=$3 i
    shift 3
    "$@" >"$TMP/$log" 2>&1 &
    STARTED_PID=$!
    for ((i = 0; i < 200; i++)); do
        if eval "$check" >/dev/null 2>&1; then
            PIDS+=("$STARTED_PID")
            return 0
        fi
        if ! kill -0 "$STARTED_PID" 2>/dev/null; then
            grep -q "already in use" "$TMP/$log" && return 1
            break
        fi
        sleep 0.05
    done
    kill "$STARTED_PID" 2>/dev/null || true
    tail -n 20 "$TMP/$log" >&2 || true
    die "$what did not become ready"
}

# ----- origin -----

# Starts nginx (one worker, sendfile) serving /10k (10 KiB) and /bulk (BULK_MIB MiB);
# sets ORIGIN.
start_origin() {
    local port attempt
    mkdir -p "$TMP/www" "$TMP/nginx"
    head -c 10240 /dev/urandom >"$TMP/www/10k"
    # Sparse: served from the page cache, so the origin's disk is out of the picture.
    truncate -s "${BULK_MIB}M" "$TMP/www/bulk"
    chmod 644 "$TMP/www/"*
    for ((attempt = 1; attempt <= 5; attempt++)); do
        port=$(free_ports 1)
        cat >"$TMP/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$port;
        root $TMP/www;
    }
}
NGINX
        ORIGIN=http://127.0.0.1:$port
        start_listening "origin (nginx)" nginx.out "curl -sf -o /dev/null $ORIGIN/10k" \
            nginx -p "$TMP/nginx" -e "$TMP/nginx.log" -c "$TMP/nginx/nginx.conf" && return 0
    done
    die "no free port for the origin after 5 tries"
}

# ----- tunnel -----

# Starts a server and an agent from the binaries $1 (agent) and $2 (server), with
# certificates made once in $TMP/certs; sets AGENT_PID, SERVER_PID and PROXY.
start_tunnel() {
    local agent=$1 server=$2 server_port health_port agent_port attempt
    [ -d "$TMP/certs" ] || "$agent" certs init --dir "$TMP/certs" >"$TMP/certs.log" 2>&1
    for ((attempt = 1; attempt <= 5; attempt++)); do
        read -r server_port health_port agent_port < <(free_ports 3)
        start_listening fluidity-server server.log \
            "curl -sf -o /dev/null http://127.0.0.1:$health_port/healthz" \
            "$server" --listen "127.0.0.1:$server_port" --health-listen "127.0.0.1:$health_port" \
            --cert "$TMP/certs/server.pem" --key "$TMP/certs/server-key.pem" \
            --client-ca "$TMP/certs/ca.pem" --egress allow_cidrs=127.0.0.1/32 || continue
        SERVER_PID=$STARTED_PID
        PROXY=127.0.0.1:$agent_port
        if start_listening "fluidity agent" agent.log \
            "curl -sf -o /dev/null -x http://$PROXY $ORIGIN/10k" \
            "$agent" run --listen "$PROXY" --server "127.0.0.1:$server_port" \
            --cert "$TMP/certs/client.pem" --key "$TMP/certs/client-key.pem" \
            --ca "$TMP/certs/ca.pem"; then
            AGENT_PID=$STARTED_PID
            return 0
        fi
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    done
    die "no free ports for the tunnel after 5 tries"
}

# Stops the agent and the server started last.
stop_tunnel() {
    kill "$AGENT_PID" "$SERVER_PID" 2>/dev/null || true
    wait "$AGENT_PID" "$SERVER_PID" 2>/dev/null || true
}

# ----- measurements -----

# Seconds for one bulk download (curl options in "$@"); checks the status and byte count.
bulk() {
    local out code size secs
    out=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$@" "$ORIGIN/bulk" || true)
    read -r code size secs <<<"$out"
    [ "$code" = 200 ] && [ "$size" = $((BULK_MIB * 1024 * 1024)) ] ||
        die "bulk download failed: status $code, $size bytes"
    echo "$secs"
}

# Runs hey; prints "rate p50_ms p99_ms", failing on any non-200 answer or error.
load() {
    local n=$1 c=$2
    shift 2
    local out
    # hey gives each client n/c requests.
    local expected=$((n / c * c))
    out=$(hey -n "$n" -c "$c" "$@" "$ORIGIN/10k")
    if ! grep -q "\[200\]	$expected responses" <<<"$out" || grep -q "Error distribution" <<<"$out"; then
        printf '%s\n' "$out" >&2
        die "load run had failures"
    fi
    awk '
        /Requests\/sec:/ { rate = $2 }
        /^ *50% in/ { p50 = $3 * 1000 }
        /^ *99% in/ { p99 = $3 * 1000 }
        END { printf "%.1f %.3f %.3f\n", rate, p50, p99 }
    ' <<<"$out"
}

# Field `f` of /proc/PID/stat for process `pid` (14: user ticks, 15: system ticks,
# 10: minor page faults).
stat_field() { awk -v f="$2" '{ print $f }' "/proc/$1/stat"; }

# CPU time (user + system, clock ticks) the agent and the server have used so far. On a
# loaded machine this is steadier than wall time: it counts the tunnel's own work.
cpu_ticks() {
    echo $(($(stat_field "$AGENT_PID" 14) + $(stat_field "$AGENT_PID" 15) +
        $(stat_field "$SERVER_PID" 14) + $(stat_field "$SERVER_PID" 15)))
}
