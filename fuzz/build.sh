#!/bin/sh
# Builds the fuzz targets on the stable toolchain with the flags cargo-fuzz passes
# (SanitizerCoverage for libFuzzer; no sanitizer, which would need -Z flags).
# Run: fuzz/build.sh; then e.g.
#   fuzz/target/x86_64-unknown-linux-gnu/release/qcow2 -max_total_time=300 -rss_limit_mb=1024 \
#       -artifact_prefix=fuzz/artifacts/qcow2/ fuzz/work/qcow2 fuzz/corpus/qcow2
set -eu
cd "$(dirname "$0")"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# With --target, RUSTFLAGS skip build scripts (they must link without libFuzzer).
exec nice cargo build --release -j 1 --bins --target x86_64-unknown-linux-gnu "$@"
