#!/usr/bin/env bash
# Bounded fuzzing run for CI and for longer local runs:
#   fuzz/run.sh SECONDS [TARGET...]
# Runs each target (default: all) for SECONDS on nightly with libFuzzer and AddressSanitizer,
# starting from the committed seeds in fuzz/corpus/<target>/. New inputs go to a scratch
# corpus (fuzz/corpus-run/<target>/, git-ignored), so the run leaves the tree clean. A crash,
# leak, timeout or out-of-memory fails the run; libFuzzer saves the input under
# fuzz/artifacts/<target>/ and prints how to reproduce it.
#
# Toolchain: nightly when rustup has it; otherwise the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags; stable ships the AddressSanitizer runtime).
# cargo-fuzz is installed from crates.io when missing (a few minutes, once per machine).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(wire_decode session table_parse message_reader guest_ram)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked 2>&1 | tail -n 1
fi
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  echo "fuzz/run.sh: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

"${fuzz[@]}" build 2>&1 | tail -n 1
mkdir -p corpus-run
for t in "${targets[@]}"; do
  mkdir -p "corpus-run/$t"
  log="corpus-run/$t.log"
  echo "=== fuzz $t for ${seconds}s"
  # -timeout: one input taking over 10 s is a hang. -rss_limit_mb: a memory blow-up fails.
  # -max_len: the largest message is 12 + 4096 bytes; larger tables are tested by unit tests.
  status=0
  "${fuzz[@]}" run "$t" "corpus-run/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::(number_of_executed_units|peak_rss_mb|new_units_added)|Done )" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz/run.sh: $t FAILED (status $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "fuzz/run.sh: ${#targets[@]} targets, ${seconds}s each, no failure"
