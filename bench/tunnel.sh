#!/usr/bin/env bash
# Tunnel benchmark: the real release binaries on loopback against a direct connection to
# the same origin, measured in the same run.
#
#   bench/tunnel.sh
#
# Measures, direct and through the tunnel (agent proxy -> TLS tunnel -> server -> origin):
#   - a 1 GiB download through CONNECT (curl -p), time ratio tunnel/direct;
#   - 10 KiB GETs through the HTTP proxy at concurrency 64 (hey), rate ratio;
#   - added latency p50/p99, at concurrency 64 (hey) and sequentially (one curl client
#     on one kept-alive connection);
#   - CPU time (user + system) the agent and the server spend per GiB and per 1000 GETs,
#     steadier than wall time on a loaded machine;
#   - peak RSS (VmHWM) of the agent and the server after all runs.
# It prints a table and exits 0 whether or not a goal is met (MISSED marks a miss); it
# exits non-zero only when the benchmark itself cannot run.
#
# Settings (environment):
#   BENCH_ROUNDS=2          rounds of each measurement, alternating direct and tunnel;
#                           the best round of each counts
#   BENCH_BULK_MIB=1024     size of the CONNECT download
#   BENCH_REQUESTS=20000    requests per concurrent run
#   BENCH_CONCURRENCY=64    concurrent clients
#   BENCH_SEQ_REQUESTS=2000 requests per sequential run
#   BENCH_SKIP_BUILD=1      use the release binaries already built
#   AGENT_BIN, SERVER_BIN   the binaries to measure (default: fluidity and fluidity-server
#                           in $CARGO_TARGET_DIR/release, or target/release without it)
#   BENCH_COMMIT            the commit the binaries were built from, for the report
#                           (default: this checkout's HEAD)
#
# Needs curl, python3 (free ports), nginx (origin) and hey (load tool with -x for a
# forward proxy); nginx and hey are installed from Debian's packages when missing.
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-2}
BULK_MIB=${BENCH_BULK_MIB:-1024}
REQUESTS=${BENCH_REQUESTS:-20000}
CONCURRENCY=${BENCH_CONCURRENCY:-64}
SEQ_REQUESTS=${BENCH_SEQ_REQUESTS:-2000}

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "building release binaries"
    cargo build --release -p fluidity-agent -p fluidity-server
fi
# Cargo puts its output in CARGO_TARGET_DIR when that is set (the project's scripts share
# one), not in target/.
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
AGENT_BIN=${AGENT_BIN:-$BIN_DIR/fluidity}
SERVER_BIN=${SERVER_BIN:-$BIN_DIR/fluidity-server}
[ -x "$AGENT_BIN" ] && [ -x "$SERVER_BIN" ] || die "release binaries missing ($AGENT_BIN, $SERVER_BIN)"
read -r AGENT_BIN SERVER_BIN < <(private_copies "$AGENT_BIN" "$SERVER_BIN" measured)

start_origin
start_tunnel "$AGENT_BIN" "$SERVER_BIN"

# ----- measurements -----

# One client, one kept-alive connection, requests one after another (curl, microsecond
# timings; hey reports only tenths of a millisecond). Prints "p50_ms p99_ms".
sequential() {
    local n=$1
    shift
    local cfg=$TMP/seq.curl i
    : >"$cfg"
    for ((i = 0; i < n; i++)); do
        printf 'url = "%s/10k"\noutput = "/dev/null"\n' "$ORIGIN" >>"$cfg"
    done
    curl -s --fail -K "$cfg" -w '%{http_code} %{time_total}\n' "$@" >"$TMP/seq.out" || true
    if [ "$(grep -c '^200 ' "$TMP/seq.out")" != "$n" ]; then
        die "sequential run failed: $(grep -vc '^200 ' "$TMP/seq.out") bad answers"
    fi
    awk '{ printf "%.3f\n", $2 * 1000 }' "$TMP/seq.out" | sort -g >"$TMP/seq.sorted"
    echo "$(sed -n "$((n / 2))p" "$TMP/seq.sorted") $(sed -n "$((n * 99 / 100))p" "$TMP/seq.sorted")"
}

min() { printf '%s\n' "$@" | sort -g | head -n 1; }

TICKS=$(getconf CLK_TCK)
max() { printf '%s\n' "$@" | sort -g | tail -n 1; }

log "warming up"
bulk >/dev/null
bulk -p -x "http://$PROXY" >/dev/null
load 2000 "$CONCURRENCY" >/dev/null
load 2000 "$CONCURRENCY" -x "http://$PROXY" >/dev/null

declare -a CB CR BD BT RD RT P50D P50T P99D P99T S50D S50T S99D S99T
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS: ${BULK_MIB} MiB through CONNECT"
    BD+=("$(bulk)")
    t0=$(cpu_ticks)
    BT+=("$(bulk -p -x "http://$PROXY")")
    CB+=("$(($(cpu_ticks) - t0))")
    log "round $r/$ROUNDS: $REQUESTS x 10 KiB GET at concurrency $CONCURRENCY"
    out=$(load "$REQUESTS" "$CONCURRENCY")
    read -r rate p50 p99 <<<"$out"
    RD+=("$rate") P50D+=("$p50") P99D+=("$p99")
    t0=$(cpu_ticks)
    out=$(load "$REQUESTS" "$CONCURRENCY" -x "http://$PROXY")
    CR+=("$(($(cpu_ticks) - t0))")
    read -r rate p50 p99 <<<"$out"
    RT+=("$rate") P50T+=("$p50") P99T+=("$p99")
    log "round $r/$ROUNDS: $SEQ_REQUESTS x 10 KiB GET, one client"
    out=$(sequential "$SEQ_REQUESTS")
    read -r p50 p99 <<<"$out"
    S50D+=("$p50") S99D+=("$p99")
    out=$(sequential "$SEQ_REQUESTS" -x "http://$PROXY")
    read -r p50 p99 <<<"$out"
    S50T+=("$p50") S99T+=("$p99")
done

kb() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
AGENT_HWM=$(kb "$AGENT_PID" VmHWM)
SERVER_HWM=$(kb "$SERVER_PID" VmHWM)
AGENT_RSS=$(kb "$AGENT_PID" VmRSS)
SERVER_RSS=$(kb "$SERVER_PID" VmRSS)
# The resident part of the mapped binaries (file) against the heap and stacks (anon).
AGENT_FILE=$(kb "$AGENT_PID" RssFile) AGENT_ANON=$(kb "$AGENT_PID" RssAnon)
SERVER_FILE=$(kb "$SERVER_PID" RssFile) SERVER_ANON=$(kb "$SERVER_PID" RssAnon)
kill -0 "$AGENT_PID" "$SERVER_PID" 2>/dev/null || die "agent or server exited during the runs"

# ----- report -----

bd=$(min "${BD[@]}") bt=$(min "${BT[@]}")
rd=$(max "${RD[@]}") rt=$(max "${RT[@]}")
p50d=$(min "${P50D[@]}") p50t=$(min "${P50T[@]}")
p99d=$(min "${P99D[@]}") p99t=$(min "${P99T[@]}")
s50d=$(min "${S50D[@]}") s50t=$(min "${S50T[@]}")
s99d=$(min "${S99D[@]}") s99t=$(min "${S99T[@]}")

verdict() { awk -v ok="$1" 'BEGIN { print (ok ? "met" : "MISSED") }'; }
bulk_ratio=$(awk -v t="$bt" -v d="$bd" 'BEGIN { printf "%.2f", t / d }')
rate_ratio=$(awk -v t="$rt" -v d="$rd" 'BEGIN { printf "%.2f", t / d }')
agent_mib=$(awk -v k="$AGENT_HWM" 'BEGIN { printf "%.1f", k / 1024 }')
server_mib=$(awk -v k="$SERVER_HWM" 'BEGIN { printf "%.1f", k / 1024 }')

echo
COMMIT=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "Fluidity tunnel benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT"
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rounds: $ROUNDS (best round counts); origin nginx (1 worker) on loopback"
echo
printf '%-40s %12s %12s %10s  %-10s %s\n' "measurement" "direct" "tunnel" "ratio" "goal" "status"
printf '%-40s %12.3f %12.3f %9sx  %-10s %s\n' "${BULK_MIB} MiB via CONNECT, time (s)" "$bd" "$bt" \
    "$bulk_ratio" "<= 1.5x" "$(verdict "$(awk -v r="$bulk_ratio" 'BEGIN { print (r <= 1.5) }')")"
printf '%-40s %12.0f %12.0f %9sx  %-10s %s\n' "10 KiB GET c=$CONCURRENCY, rate (req/s)" "$rd" "$rt" \
    "$rate_ratio" ">= 0.5x" "$(verdict "$(awk -v r="$rate_ratio" 'BEGIN { print (r >= 0.5) }')")"
for row in "p50 c=$CONCURRENCY|$p50d|$p50t" "p99 c=$CONCURRENCY|$p99d|$p99t" \
    "p50 one client|$s50d|$s50t" "p99 one client|$s99d|$s99t"; do
    IFS='|' read -r name d t <<<"$row"
    printf '%-40s %12.3f %12.3f %+9.3f   %-10s %s\n' "10 KiB GET latency $name (ms)" "$d" "$t" \
        "$(awk -v t="$t" -v d="$d" 'BEGIN { print t - d }')" "(added ms)" ""
done
cb=$(min "${CB[@]}") cr=$(min "${CR[@]}")
printf '%-40s %12s %12.2f %10s  %-10s %s\n' "agent+server CPU per GiB via CONNECT (s)" "-" \
    "$(awk -v c="$cb" -v h="$TICKS" -v m="$BULK_MIB" 'BEGIN { print c / h * 1024 / m }')" "-" "-" ""
printf '%-40s %12s %12.3f %10s  %-10s %s\n' "agent+server CPU per 1000 GETs c=$CONCURRENCY (s)" "-" \
    "$(awk -v c="$cr" -v h="$TICKS" -v n="$REQUESTS" 'BEGIN { print c / h * 1000 / n }')" "-" "-" ""
# The goal is 12 MB, that is 12,000,000 bytes (11.44 MiB); VmHWM is in KiB.
within_12mb() { awk -v k="$1" 'BEGIN { print (k * 1024 <= 12000000) }'; }
printf '%-40s %12s %12s %10s  %-10s %s\n' "agent peak RSS, VmHWM (MiB)" "-" "$agent_mib" "-" "<= 12 MB" \
    "$(verdict "$(within_12mb "$AGENT_HWM")")"
printf '%-40s %12s %12s %10s  %-10s %s\n' "server peak RSS, VmHWM (MiB)" "-" "$server_mib" "-" "<= 12 MB" \
    "$(verdict "$(within_12mb "$SERVER_HWM")")"
echo
echo "all rounds: bulk direct ${BD[*]} s; tunnel ${BT[*]} s"
echo "            rate direct ${RD[*]}; tunnel ${RT[*]} req/s"
echo "            agent+server CPU ticks ($TICKS/s): bulk ${CB[*]}; GETs ${CR[*]}"
echo "RSS now: agent $((AGENT_RSS / 1024)) MiB (file $((AGENT_FILE / 1024)), anon $((AGENT_ANON / 1024))), server $((SERVER_RSS / 1024)) MiB (file $((SERVER_FILE / 1024)), anon $((SERVER_ANON / 1024)))"
