#!/usr/bin/env bash
# Runs Bulwark's fuzz targets: `fuzz/run.sh SECONDS [TARGET…]` (every target when none is named).
# Builds what it needs with cargo fuzz (stable toolchain + RUSTC_BOOTSTRAP=1 for its nightly
# flags, in this script only), runs each target for SECONDS on one core with libFuzzer's memory
# (2 GiB) and per-input time (10 s) limits and the target's own options (target_options below),
# from its corpus (fuzz/corpus/TARGET, kept between runs, not committed) plus its seeds
# (fuzz/seeds/TARGET, committed; a target with a fuzz/seeds/TARGET.sh generates more into
# fuzz/target/seeds/TARGET), and prints per target: seconds, executions, coverage (libFuzzer's
# cov = edges, ft = features) and crashes. A crash leaves its input in fuzz/artifacts/TARGET/
# and makes the script exit 1: fix the bug, then copy the input into fuzz/regressions/TARGET/ so
# the test suite replays it.
# BULWARK_FUZZ_TARGET_DIR puts the build elsewhere than fuzz/target (CI keeps it across clones).
set -euo pipefail
cd "$(dirname "$0")"

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: fuzz/run.sh SECONDS [TARGET…]" >&2
    exit 2
fi
seconds=$1
shift
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "error: cargo-fuzz is missing (cargo install --locked cargo-fuzz)" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
all_targets=$(cargo fuzz list)
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets <<<"$all_targets"
fi
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$all_targets"; then
        echo "error: no fuzz target $t (there are: $(echo $all_targets))" >&2
        exit 2
    fi
done

# libFuzzer options of one target beyond those every run gets. walk's inputs are disk images:
# its seeds are 64-170 KiB, and libFuzzer would otherwise cap every input at the largest seed.
declare -A target_options=([walk]="-max_len=1048576")

target_dir=${BULWARK_FUZZ_TARGET_DIR:-target}
started=$SECONDS
if [[ ${#targets[@]} -eq $(wc -l <<<"$all_targets") ]]; then
    cargo fuzz build --target-dir "$target_dir"
else
    for t in "${targets[@]}"; do cargo fuzz build --target-dir "$target_dir" "$t"; done
fi
echo "== fuzz targets built in $((SECONDS - started)) s"

bin_dir=$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release
mkdir -p logs
summary=()
crashed=0
for t in "${targets[@]}"; do
    corpora=("corpus/$t")
    [[ -d seeds/$t ]] && corpora+=("seeds/$t")
    if [[ -x seeds/$t.sh ]]; then
        if [[ ! -d target/seeds/$t ]]; then
            rm -rf "target/seeds/$t.tmp"
            if "seeds/$t.sh" "target/seeds/$t.tmp" >"logs/$t-seeds.log" 2>&1; then
                mv "target/seeds/$t.tmp" "target/seeds/$t"
            else
                echo "   warning: seeds/$t.sh failed (logs/$t-seeds.log); $t starts without its generated seeds"
            fi
        fi
        [[ -d target/seeds/$t ]] && corpora+=("target/seeds/$t")
    fi
    mkdir -p "corpus/$t" "artifacts/$t"
    marker=$(mktemp)
    log=logs/$t.log
    echo "== $t: ${seconds} s"
    run_started=$SECONDS
    status=0
    read -ra options <<<"${target_options[$t]:-}"
    ASAN_OPTIONS=detect_odr_violation=0:detect_leaks=0 "$bin_dir/$t" "${corpora[@]}" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "${options[@]}" >"$log" 2>&1 || status=$?
    took=$((SECONDS - run_started))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 | awk '{print $2 "/" $4}')
    crashes=$(find "artifacts/$t" -newer "$marker" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    rm -f "$marker"
    if [[ $status -ne 0 || $crashes -gt 0 ]]; then
        crashed=1
        echo "   $t FAILED (exit $status): the end of $log:"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|out-of-memory|timeout' "$log" | head -20 | sed 's/^/   /'
    fi
    summary+=("$(printf '%-10s %6s s %12s execs  cov/ft %-12s crashes %s' "$t" "$took" "${execs:-?}" "${cov:-?}" "$crashes")")
done

echo "== fuzz summary (${seconds} s per target, $((SECONDS - started)) s in all with the build)"
printf '%s\n' "${summary[@]}"
exit $crashed
