#!/usr/bin/env bash
# Import throughput: Tidepool clusters of 1 and 2 nodes reading a ~2.2 GB Parquet dataset from
# file:// (`tidepool bench import`) against Apache Spark local[2] reading and caching the same
# files, in the same run; then the peak RSS of the client streaming a CSV upload of 1 and 4
# times the size. Results in benches/import-results/ (JSON). Needs pyarrow, pyspark and Java 17:
#   pip install pyarrow pyspark; apt-get install openjdk-17-jre-headless
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/import-results
DATA=${IMPORT_DATA:-/tmp/tidepool-import-data}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
cargo build --release -q -p tidepool
T=target/release/tidepool
[ -d "$DATA/parquet" ] || python3 benches/import_data.py "$DATA/parquet"
python3 benches/spark_import.py "$DATA/parquet" "$RUNS" > "$OUT/spark.json"
$T bench import "file://$DATA/parquet/*.parquet" --label y --nodes 1,2 --shards 16 --runs "$RUNS" \
  --out "$OUT/tidepool.json"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
spark = json.load(open(f"{out}/spark.json"))
tp = json.load(open(f"{out}/tidepool.json"))
s_rate = statistics.median(r["rows_per_sec"] for r in spark["runs"])
s_mb = statistics.median(r["mb_per_sec"] for r in spark["runs"])
spark_secs = ", ".join("%.1f s" % r["seconds"] for r in spark["runs"])
print(f"spark local[2]: median {s_rate:,.0f} rows/s, {s_mb:.1f} MB/s (runs: {spark_secs})")
for c in tp:
    secs = ", ".join("%.1f s" % r["seconds"] for r in c["runs"])
    rss = ", ".join("%.0f" % m for m in c["peak_rss_mib"])
    print(f"tidepool {c['nodes']} node(s): median {c['median_rows_per_sec']:,.0f} rows/s, "
          f"{c['median_mb_per_sec']:.1f} MB/s, {c['median_rows_per_sec'] / s_rate:.2f}x spark "
          f"(runs: {secs}); peak RSS per node {rss} MiB")
PY
