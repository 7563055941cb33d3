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
# The same rows as CSV, 1 and 4 files' worth, for the client's streamed upload.
for n in 1 4; do
  [ -f "$DATA/upload-$n.csv" ] || python3 -c '
import sys, pyarrow.csv as c, pyarrow.parquet as p, pyarrow as pa, glob
files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))[: int(sys.argv[2])]
c.write_csv(pa.concat_tables([p.read_table(f) for f in files]), sys.argv[3])
' "$DATA/parquet" "$n" "$DATA/upload-$n.csv"
done
python3 benches/spark_import.py "$DATA/parquet" "$RUNS" > "$OUT/spark.json"
# Nodes get a 512 MiB memory budget: the training job after the imports reads 2.2 GB of
# partitions (over 4x the budget).
$T bench import "file://$DATA/parquet/*.parquet" --label y --nodes 1,2 --shards 16 --runs "$RUNS" \
  --memory-budget 536870912 --csv "$DATA/upload-1.csv" --csv "$DATA/upload-4.csv" \
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
    j = c.get("job")
    if j:
        print(f"  job over {j['data_mib']:.0f} MiB of partitions, budget {j['budget_mib']:.0f} MiB: "
              f"{j['seconds']:.1f} s; node RSS before {', '.join('%.0f' % v for v in j['rss_before_mib'])}"
              f" MiB, peak {', '.join('%.0f' % v for v in j['rss_peak_mib'])} MiB")
    for u in c.get("uploads", []):
        print(f"  client upload of {u['file_mib']:.0f} MiB CSV ({u['rows']} rows): {u['seconds']:.1f} s, "
              f"client RSS {u['client_rss_before_mib']:.0f} -> peak {u['client_rss_peak_mib']:.0f} MiB")
PY
