#!/usr/bin/env bash
# k-means against scikit-learn on the same 500 000 x 64 points (8 Gaussian blobs, float32):
# scikit-learn's KMeans (greedy k-means++, n_init=1, tol=1e-4, max_iter=50) and a one-node
# Tidepool cluster (`tidepool bench kmeans`, the same defaults; n_init 1 and 3), three seeds each,
# in the same run. Results in benches/kmeans-results/. Needs pyarrow and scikit-learn.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/kmeans-results
DATA=${KMEANS_DATA:-/tmp/tidepool-kmeans-data}
mkdir -p "$OUT" "$DATA"
cargo build --release -q -p tidepool
T=target/release/tidepool
python3 benches/kmeans_peer.py "$DATA/points.parquet" > "$OUT/sklearn.json"
$T bench kmeans "file://$DATA/points.parquet" --label blob --k 8 --seeds 1,2,3 --out "$OUT/tidepool-n1.json"
$T bench kmeans "file://$DATA/points.parquet" --label blob --k 8 --seeds 1,2,3 --n-init 3 \
  --out "$OUT/tidepool-n3.json"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
sk = json.load(open(f"{out}/sklearn.json"))["runs"]
best = min(r["inertia"] for r in sk)
def show(name, runs):
    secs = statistics.median(r["seconds"] for r in runs)
    inert = statistics.median(r["inertia"] for r in runs)
    its = ", ".join(str(r["iterations"]) for r in runs)
    print(f"{name}: median {secs:.2f} s, inertia {inert:.4e} ({inert / best:.4f}x sklearn's best), iterations {its}")
    return secs
s = show("scikit-learn", sk)
for n in ("n1", "n3"):
    t = show(f"tidepool {n}", json.load(open(f"{out}/tidepool-{n}.json")))
    print(f"  time vs scikit-learn: {t / s:.2f}x")
PY
