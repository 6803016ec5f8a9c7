#!/usr/bin/env bash
# The GPU measurements of the training benchmarks, with the PyTorch peer in
# the same run, on a machine with jax (CUDA), flax, optax, orbax, torch and
# numpy but no TensorFlow (the project's lent GPU machines). Meant for one
# device call of at most 10 minutes; not run on a GPU yet (on this 2-core
# CPU with BATCHES=8 LOOP_STEPS=20: 78 s). Results: one JSON line per
# measurement in $OUT/gpu_check.jsonl (and on stdout), the card's name
# first.
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
# (train_loop steps, default 20000: a 5,000-step run at batch 1,024 on an
# H200 was about 5 s of steps beside a 6.8 s compile), PEER (path of torch_twobranch.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
: > "$LOG"
BATCHES=${BATCHES:-"128 1024 8192"}
LOOP_STEPS=${LOOP_STEPS:-20000}
PEER=${PEER:-.gpu/torch_twobranch.py}
PY=${PYTHON:-python3}

if [ -d .gpu/wheels ]; then
  $PY -m pip install -q --no-index --no-deps --find-links .gpu/wheels \
    .gpu/wheels/* 2>&1 | tail -2
fi

# Every JSON line of a command to the log; the rest of its output to
# $OUT/<name>.log, so a failure says why.
record() {
  local name=$1; shift
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  local rc=$?
  grep -h '^{' "$OUT/$name.out" | grep -v '"benchmarks"' | tee -a "$LOG"
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

BENCH="$PY launch.py --config configs/default.py --workdir $OUT/bench --mode=benchmark"
sizes=$(echo $BATCHES | tr ' ' ,)
# The step alone: the mean encoder with the update 'auto' picks, the LSTM
# with a loop per direction and both directions in one loop.
record mean $BENCH --config.benchmark.kind=train \
  --config.benchmark.encoders=mean --config.benchmark.batch_sizes=$sizes
record lstm $BENCH --config.benchmark.kind=train \
  --config.benchmark.encoders=lstm --config.benchmark.batch_sizes=$sizes \
  --config.benchmark.lstm_loops=per_direction,bidirectional
# The peer, each variant (the padded LSTM runs out of memory at 8,192 on an
# H200; its failure is recorded and the rest goes on).
for b in $BATCHES; do
  for v in "" --sparse; do
    record "peer_mean_$b$v" $PY "$PEER" mean --device cuda --batch $b $v
  done
  for v in "" --padded; do
    record "peer_lstm_$b$v" $PY "$PEER" lstm --device cuda --batch $b $v
  done
done
# The training loop end to end at batch 1,024.
record train_loop $BENCH --config.benchmark.kind=train_loop \
  --config.train.batch_size=1024 --config.benchmark.train_loop_steps=$LOOP_STEPS
