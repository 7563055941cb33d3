#!/usr/bin/env bash
# Matrix factorisation at scale: a model of over 100 M parameters (1.7 M users and 10 000 items
# at rank 64 = 109 M) trained for one epoch over 6.7 M ratings (about 4 per user, so almost every
# user is in the training set and so in the tables) on a local cluster of 4 nodes
# (`tidepool bench mf --scale`). Per node: `tidepool_param_table_bytes` against the touched model
# bytes / 4 x 1.25, and the peak RSS against the tables plus the node's RSS before the job.
# Once with 16 shards (the bench's default) and once with 64: the placement gives nodes unequal
# shard counts, which the 25% slack must absorb. Results in benches/mf-results/scale-SHARDS.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MF_OUT:-benches/mf-results}
USERS=${MF_USERS:-1700000} ITEMS=${MF_ITEMS:-10000} RATINGS=${MF_RATINGS:-6800000}
DATA=${MF_DATA:-/tmp/mfbench-data-$USERS-$ITEMS-$RATINGS}
NODES=${MF_NODES:-4} RANK=${MF_RANK:-64} SHARDS=${MF_SHARDS:-16 64}
# Tables may hold half of the budget: 512 MiB per node, 4x a quarter of the model (the
# default budget, 8 GiB, would do too).
BUDGET=${MF_BUDGET:-1073741824}
mkdir -p "$OUT"
if [ -z "${MF_TIDEPOOL:-}" ]; then
  cargo build --release -q -p tidepool
fi
T=${MF_TIDEPOOL:-target/release/tidepool}
if [ ! -f "$DATA/train.csv" ]; then
  $T dataset builtin ratings --out "$DATA" --users "$USERS" --items "$ITEMS" \
    --ratings "$RATINGS" --rank 8 --noise 0.3 --data-seed 42 --test-fraction 0.01 --seed 1 --json
fi
start=$(date +%s)
for s in $SHARDS; do
  $T bench mf --scale --train "$DATA/train.csv" --nodes "$NODES" --shards "$s" --epochs 1 \
    --rank "$RANK" --batch-size 100000 --learning-rate 0.002 --l2 0.005 \
    --memory-budget "$BUDGET" --out "$OUT/scale-$s.json"
done
echo "took $(( $(date +%s) - start )) s"
