#!/usr/bin/env bash
# Scaling of synchronous SGD beyond this 2-core box: 1, 2, 4 and 8 local nodes (one worker
# thread each) on the seeded synthetic dataset, samples/s and efficiency T1 / (n * Tn) per size.
# Meant for a machine with at least 16 cores; finishes in under 5 minutes there.
#
#   bash benches/scaling.sh                 # 2 M rows x 64 features, 1/2/4/8 nodes
#   ROWS=200000 NODES=1,2 bash benches/scaling.sh   # a quick run on a small machine
#
# Prints one line per size and writes target/scaling.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-2000000}
FEATURES=${FEATURES:-64}
BATCH=${BATCH:-65536}
STEPS=${STEPS:-150}
NODES=${NODES:-1,2,4,8}
SHARDS=${SHARDS:-64}
echo "cores: $(nproc); rows ${ROWS} x ${FEATURES}, batch ${BATCH}, ${STEPS} steps, nodes ${NODES}"
cargo build --release --quiet -p tidepool
timeout 300 ./target/release/tidepool bench train \
  --nodes "${NODES}" --workers 1 --shards "${SHARDS}" \
  --rows "${ROWS}" --features "${FEATURES}" --batch "${BATCH}" --steps "${STEPS}" \
  --out target/scaling.json
