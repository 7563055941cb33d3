"""The peer of `tidepool bench import`: Apache Spark (pyspark, local[2]) reads the same Parquet
files and caches them (`spark.read.parquet(dir).cache().count()`), RUNS times in one session
(unpersisted in between); prints one JSON document with each run's seconds, rows/s and source
MB/s. The JVM's start is not timed, as the Tidepool cluster's start is not.

    python3 benches/spark_import.py DIR [RUNS]
"""

import json
import os
import sys
import time

from pyspark.sql import SparkSession


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if n.endswith(".parquet"))
    spark = (SparkSession.builder.master("local[2]").appName("tidepool-import-peer")
             .config("spark.driver.memory", "8g")
             .config("spark.ui.enabled", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    out = []
    for run in range(runs):
        t0 = time.perf_counter()
        df = spark.read.parquet(path).cache()
        rows = df.count()
        secs = time.perf_counter() - t0
        out.append({"run": run, "seconds": secs, "rows": rows,
                    "rows_per_sec": rows / secs, "mb_per_sec": size / 1e6 / secs})
        print(f"spark local[2], run {run}: {rows} rows in {secs:.2f} s", file=sys.stderr)
        df.unpersist(blocking=True)
    spark.stop()
    print(json.dumps({"source_bytes": size, "runs": out}))


if __name__ == "__main__":
    main()
