#!/usr/bin/env bash
# Fuzz smoke: builds every cargo-fuzz target once and runs each for FUZZ_SECONDS
# (default 15) on the stable toolchain (no sanitizer, `-s none`; debug assertions and
# overflow checks on). Fails on the first crash, naming the target and the input that
# crashed it. The checked-in corpus (fuzz/corpus/<target>/) is replayed first by every
# run; inputs the run discovers go to a scratch directory, never into the repository.
#
# FUZZ_TARGETS="a b" limits the run to some targets; FUZZ_WORK sets the scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fluidity-target}"
FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
FUZZ_TARGET_DIR="$CARGO_TARGET_DIR/fuzz"
FUZZ_WORK="${FUZZ_WORK:-$CARGO_TARGET_DIR/fuzz-work}"
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# The fuzz crate is its own workspace; start from the main lock file so that it builds
# the same dependency versions as the project.
if [ ! -f fuzz/Cargo.lock ]; then
  cp Cargo.lock fuzz/Cargo.lock
fi

# The same flags for build and run, so that run reuses the build.
flags=(-s none --debug-assertions --target-dir "$FUZZ_TARGET_DIR")

start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz targets built in $(( $(date +%s) - start )) s"

if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
  corpus="$FUZZ_WORK/corpus/$t"
  artifacts="$FUZZ_WORK/artifacts/$t"
  rm -rf "$artifacts"
  mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$t"
  log="$FUZZ_WORK/$t.log"
  echo "== fuzzing $t for ${FUZZ_SECONDS}s"
  # New inputs go to the scratch corpus (first directory); the checked-in one is read.
  if cargo fuzz run "${flags[@]}" "$t" "$corpus" "fuzz/corpus/$t" -- \
      -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
      -max_len=8192 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done' "$log" | sed "s/^/   $t: /" || true
  else
    failed+=("$t")
    echo "!! $t crashed; last lines of $log:"
    tail -n 40 "$log"
    for a in "$artifacts"/*; do
      [ -e "$a" ] || continue
      echo "!! crashing input: $a"
      echo "!! reproduce: cargo fuzz run ${flags[*]} $t $a"
    done
  fi
done

echo "fuzzing took $(( $(date +%s) - start )) s for ${#targets[@]} targets"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]}" >&2
  exit 1
fi
echo "no crashes"
