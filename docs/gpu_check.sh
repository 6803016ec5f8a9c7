#!/usr/bin/env bash
# The GPU measurements of the training benchmarks, with the PyTorch peer in
# the same run, on a machine with jax (CUDA), flax, optax, orbax, torch and
# numpy but no TensorFlow. Meant for one device call of at most 10 minutes.
# Results: benchmark records (machine, versions, commit, date) in
# $OUT/results/<kind>.jsonl, to be copied into docs/results/ and rendered
# with `python -m mardjax.experiments.results render`; the page rendered
# from this run alone in $OUT/performance.md; and one JSON line per
# measurement in $OUT/gpu_check.jsonl (and on stdout), the card's name
# first; each command's output in $OUT/logs.tar.gz. Each command has its
# own time limit, 560 seconds in all.
#
# Prepare, in the repository root of a development machine (the device
# machine reaches no package index):
#   mkdir -p .gpu && cp ../shared/peers/torch_twobranch.py .gpu/
#   pip download --no-deps -d .gpu/wheels ml_collections==1.1.0 \
#     psutil==7.2.2 tqdm==4.70.1
#   echo /.gpu/ >> .git/info/exclude
# then run `bash docs/gpu_check.sh` there with .gpu carried along.
#
# Overrides (environment): BATCHES (default "128 1024 8192"), LOOP_STEPS
# (train_loop steps, default 20000: long enough that the loop's compile is
# a small part of it), PEER (path of torch_twobranch.py; '' skips the peer),
# MIN_SECONDS (each step's minimum timed seconds, default 5).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
: > "$LOG"
BATCHES=${BATCHES:-"128 1024 8192"}
LOOP_STEPS=${LOOP_STEPS:-20000}
PEER=${PEER-.gpu/torch_twobranch.py}
MIN_SECONDS=${MIN_SECONDS:-5}
RESULTS="$OUT/results"
PY=${PYTHON:-python3}

if [ -d .gpu/wheels ]; then
  $PY -m pip install -q --no-index --no-deps --find-links .gpu/wheels \
    .gpu/wheels/* 2>&1 | tail -2
fi

# Each command's output goes to $LOGS/<name>.out and .log (archived into
# $OUT/logs.tar.gz at the end, so a failure says why); its JSON lines to the
# log. A command that runs past its seconds is stopped (rc 124) and the
# next one runs: one slow part never costs the whole call.
LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXXXX)
record() {
  local name=$1 seconds=$2; shift 2
  timeout --kill-after=10 "$seconds" "$@" > "$LOGS/$name.out" \
    2> "$LOGS/$name.log"
  local rc=$?
  grep -h '^{' "$LOGS/$name.out" | grep -v '"benchmarks"' | tee -a "$LOG"
  [ $rc = 0 ] || echo "{\"failed\": \"$name\", \"rc\": $rc}" | tee -a "$LOG"
}

{
  echo -n '{"card": "'
  { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null ||
    echo none; } | head -1 | tr -d '\n'
  echo -n '", "jax": "'
  $PY -c 'import jax; print(jax.__version__, end="")'
  echo -n '", "commit": "'
  git rev-parse --short HEAD 2>/dev/null | tr -d '\n'
  echo '"}'
} | tee -a "$LOG"

BENCH="$PY launch.py --config configs/default.py --workdir $OUT/bench --mode=benchmark --config.benchmark.results_dir=$RESULTS"
sizes=$(echo $BATCHES | tr ' ' ,)
# The step alone, with the peer's variants at each encoder and batch size in
# the same run: the mean encoder with the update 'auto' picks, the LSTM with
# a loop per direction and both directions in one loop. The peer runs in a
# subprocess beside this one on the same card: without preallocation jax
# holds only what its steps used, and the rest is the peer's (a variant
# that runs out of memory is recorded as a failure; the run goes on).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# What the compiled step is made of, on this card (compiling only).
record program 60 $BENCH --config.benchmark.kind=program \
  --config.benchmark.batch_sizes=$sizes
record mean 180 $BENCH --config.benchmark.kind=train \
  --config.benchmark.encoders=mean --config.benchmark.batch_sizes=$sizes \
  --config.benchmark.min_seconds=$MIN_SECONDS --config.benchmark.peer=$PEER
record lstm 150 $BENCH --config.benchmark.kind=train \
  --config.benchmark.encoders=lstm --config.benchmark.batch_sizes=$sizes \
  --config.benchmark.lstm_loops=per_direction,bidirectional \
  --config.benchmark.min_seconds=$MIN_SECONDS --config.benchmark.peer=$PEER
unset XLA_PYTHON_CLIENT_PREALLOCATE
# The training loop end to end at batch 1,024.
record train_loop 150 $BENCH --config.benchmark.kind=train_loop \
  --config.train.batch_size=1024 --config.benchmark.train_loop_steps=$LOOP_STEPS
record render 20 $PY -m mardjax.experiments.results render \
  --results_dir "$RESULTS" --out "$OUT/performance.md" --readme ''
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
