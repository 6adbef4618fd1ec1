#!/usr/bin/env bash
# Compares two builds: alternating runs of one load, each with a fresh server and agent
# from one build, and the medians of what each build cost.
#
#   bench/compare.sh BEFORE_DIR AFTER_DIR
#
# Each directory holds a `fluidity` and a `fluidity-server` (for example release binaries
# built from two commits). Per run it records the agent's and the server's CPU time (user
# + system, from /proc), the agent's minor page faults, the run's wall time and both
# processes' peak RSS (VmHWM), then prints the median of each for both builds and the
# ratio after/before. Medians of alternating pairs are what separates two builds whose
# difference is smaller than the spread of single runs on a shared machine
# (docs/PERFORMANCE.md, section 2).
#
# Settings (environment):
#   COMPARE_LOAD=bulk    bulk: one download through CONNECT per run;
#                        gets: 10 KiB GETs through the HTTP proxy at concurrency 64 (hey)
#   COMPARE_PAIRS=8      runs per build, alternating (which build goes first alternates too)
#   BENCH_BULK_MIB=1024  size of each download
#   BENCH_REQUESTS=20000 requests per run of the GET load
#
# Needs what bench/tunnel.sh needs (curl, python3, nginx; installed when missing).
set -euo pipefail

[ $# = 2 ] || {
    sed -n '2,5p' "$0" >&2
    exit 2
}
PAIRS=${COMPARE_PAIRS:-8}
LOAD=${COMPARE_LOAD:-bulk}
BULK_MIB=${BENCH_BULK_MIB:-1024}
REQUESTS=${BENCH_REQUESTS:-20000}
case $LOAD in
bulk) WHAT="${BULK_MIB} MiB through CONNECT" ;;
gets) WHAT="$REQUESTS x 10 KiB GET at concurrency 64" ;;
*)
    echo "COMPARE_LOAD must be bulk or gets, not '$LOAD'" >&2
    exit 2
    ;;
esac
BEFORE_DIR=$(cd "$1" && pwd) AFTER_DIR=$(cd "$2" && pwd)

# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for dir in "$BEFORE_DIR" "$AFTER_DIR"; do
    [ -x "$dir/fluidity" ] && [ -x "$dir/fluidity-server" ] ||
        die "$dir must hold fluidity and fluidity-server"
done
# Both builds are copied now, together: how much of a binary the kernel maps in depends on
# how recently its file was written, and that must not differ between them.
read -r BEFORE_AGENT BEFORE_SERVER < <(private_copies "$BEFORE_DIR/fluidity" "$BEFORE_DIR/fluidity-server" before)
read -r AFTER_AGENT AFTER_SERVER < <(private_copies "$AFTER_DIR/fluidity" "$AFTER_DIR/fluidity-server" after)
sync

start_origin
bulk >/dev/null

kb() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }

# One run of the load through a fresh tunnel of the build $1 (agent) and $2 (server);
# prints "agent_ticks server_ticks agent_faults seconds agent_hwm_kib server_hwm_kib".
measure() {
    local agent=$1 server=$2 a0 s0 f0 secs t0
    start_tunnel "$agent" "$server"
    # Warm-up, so that start-up and first allocations are not counted.
    if [ "$LOAD" = bulk ]; then
        curl -s -o /dev/null -p -x "http://$PROXY" -r 0-$((64 * 1024 * 1024 - 1)) "$ORIGIN/bulk"
    else
        load 2000 64 -x "http://$PROXY" >/dev/null
    fi
    a0=$(($(stat_field "$AGENT_PID" 14) + $(stat_field "$AGENT_PID" 15)))
    s0=$(($(stat_field "$SERVER_PID" 14) + $(stat_field "$SERVER_PID" 15)))
    f0=$(stat_field "$AGENT_PID" 10)
    if [ "$LOAD" = bulk ]; then
        secs=$(bulk -p -x "http://$PROXY")
    else
        t0=$(date +%s.%N)
        load "$REQUESTS" 64 -x "http://$PROXY" >/dev/null
        secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
    fi
    echo "$(($(stat_field "$AGENT_PID" 14) + $(stat_field "$AGENT_PID" 15) - a0))" \
        "$(($(stat_field "$SERVER_PID" 14) + $(stat_field "$SERVER_PID" 15) - s0))" \
        "$(($(stat_field "$AGENT_PID" 10) - f0))" "$secs" \
        "$(kb "$AGENT_PID" VmHWM)" "$(kb "$SERVER_PID" VmHWM)"
    stop_tunnel
}

: >"$TMP/before" >"$TMP/after"
for ((i = 1; i <= PAIRS; i++)); do
    log "pair $i/$PAIRS: $WHAT with each build"
    if ((i % 2)); then
        measure "$BEFORE_AGENT" "$BEFORE_SERVER" >>"$TMP/before"
        measure "$AFTER_AGENT" "$AFTER_SERVER" >>"$TMP/after"
    else
        measure "$AFTER_AGENT" "$AFTER_SERVER" >>"$TMP/after"
        measure "$BEFORE_AGENT" "$BEFORE_SERVER" >>"$TMP/before"
    fi
done

TICKS=$(getconf CLK_TCK)
# Median of column $2 of file $1.
median() {
    awk -v c="$2" '{ print $c }' "$1" | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# Per-run sums of the agent's and the server's ticks, as a column of their own.
awk '{ print $0, $1 + $2 }' "$TMP/before" >"$TMP/before.sum"
awk '{ print $0, $1 + $2 }' "$TMP/after" >"$TMP/after.sum"

echo
echo "Fluidity build comparison, $(date -u +%Y-%m-%dT%H:%MZ): $WHAT, $PAIRS alternating pairs"
echo "before: $BEFORE_DIR"
echo "after:  $AFTER_DIR"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-34s %12s %12s %10s\n' "median per run" "before" "after" "after/before"
row() {
    local name=$1 col=$2 scale=$3 fmt=$4 b a
    b=$(median "$TMP/before.sum" "$col") a=$(median "$TMP/after.sum" "$col")
    printf "%-34s $fmt $fmt %9.2fx\n" "$name" \
        "$(awk -v v="$b" -v s="$scale" 'BEGIN { print v * s }')" \
        "$(awk -v v="$a" -v s="$scale" 'BEGIN { print v * s }')" \
        "$(awk -v b="$b" -v a="$a" 'BEGIN { print (b > 0) ? a / b : 0 }')"
}
row "agent CPU time (s)" 1 "$(awk -v h="$TICKS" 'BEGIN { print 1 / h }')" "%12.2f"
row "server CPU time (s)" 2 "$(awk -v h="$TICKS" 'BEGIN { print 1 / h }')" "%12.2f"
row "agent + server CPU time (s)" 7 "$(awk -v h="$TICKS" 'BEGIN { print 1 / h }')" "%12.2f"
row "wall time (s)" 4 1 "%12.3f"
row "agent page faults" 3 1 "%12.0f"
row "agent peak RSS, VmHWM (MiB)" 5 "$(awk 'BEGIN { print 1 / 1024 }')" "%12.1f"
row "server peak RSS, VmHWM (MiB)" 6 "$(awk 'BEGIN { print 1 / 1024 }')" "%12.1f"
echo
echo "every run (agent ticks, server ticks, agent faults, seconds, agent and server VmHWM KiB):"
echo "  before: $(tr '\n' ';' <"$TMP/before")"
echo "  after:  $(tr '\n' ';' <"$TMP/after")"
