#!/usr/bin/env bash
# The training step's math against the memory bandwidth and scikit-learn, in the same run:
# `tidepool bench math` (a full pass of the minibatch kernel on one core over 2 000 000 x 64
# f32 rows, linear / logistic / softmax, and a streaming read of the same rows), three times,
# then scikit-learn's L-BFGS logistic regression on the same rows (benches/math_peer.py; one
# thread and every core). Results in benches/math-results/. Needs numpy and scikit-learn.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/math-results
DATA=${MATH_DATA:-/tmp/tidepool-math-rows.f32}
ROWS=${ROWS:-2000000}
mkdir -p "$OUT"
cargo build --release -q -p tidepool
T=target/release/tidepool
for run in 1 2 3; do
  dump=()
  [ "$run" = 1 ] && dump=(--dump "$DATA")
  $T bench math --rows "$ROWS" --features 64 --reps 5 "${dump[@]}" --out "$OUT/tidepool-$run.json" > /dev/null
done
python3 benches/math_peer.py "$DATA" "$ROWS" 64 3 > "$OUT/sklearn.json"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
runs = [json.load(open(f"{out}/tidepool-{r}.json")) for r in (1, 2, 3)]
def med(what, key):
    return statistics.median(next(x[key] for x in r["results"] if x["what"] == what) for r in runs)
bw = statistics.median(r["bandwidth_bytes_per_sec"] for r in runs)
print(f"streaming read: {bw / 1e9:.2f} GB/s (median of 3)")
for what in ("linear gradient", "logistic gradient", "softmax gradient",
             "logistic gradient, gathered copy + nalgebra (previous kernel)"):
    rps = med(what, "rows_per_sec")
    fr = [next(x["fraction_of_bandwidth"] for x in r["results"] if x["what"] == what) for r in runs]
    print(f"{what}: {rps / 1e6:.1f} M rows/s per core, {statistics.median(fr):.2f} of the bandwidth "
          f"limit (runs {', '.join(f'{f:.2f}' for f in fr)})")
sk = json.load(open(f"{out}/sklearn.json"))["runs"]
logit = med("logistic gradient", "rows_per_sec")
for threads in sorted({r["threads"] for r in sk}):
    rs = [r["rows_x_passes_per_sec"] for r in sk if r["threads"] == threads]
    m = statistics.median(rs)
    print(f"scikit-learn L-BFGS, {threads} thread(s): {m / 1e6:.1f} M rows x passes/s "
          f"(runs {', '.join(f'{r / 1e6:.1f}' for r in rs)}); Tidepool's logistic pass on one core: "
          f"{logit / m:.2f}x")
PY
