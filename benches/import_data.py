"""Writes the Parquet dataset `benches/import.sh` imports: FILES files of ROWS rows each, 64
float32 features x0..x63 and a float32 0/1 label y, seeded, snappy (pyarrow's default), row
groups of 131072 rows. Random floats do not compress: 16 x 520 000 rows is about 2.2 GB.

    python3 benches/import_data.py OUT_DIR [FILES] [ROWS]
"""

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main():
    out = sys.argv[1]
    files = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 520_000
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    w = rng.standard_normal(64).astype(np.float32)
    for f in range(files):
        x = rng.standard_normal((rows, 64), dtype=np.float32)
        y = (x @ w > 0).astype(np.float32)
        cols = {f"x{j}": x[:, j] for j in range(64)}
        cols["y"] = y
        pq.write_table(pa.table(cols), os.path.join(out, f"part-{f:04}.parquet"),
                       row_group_size=131072)
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{files * rows} rows, {total / 1e9:.2f} GB in {out}")


if __name__ == "__main__":
    main()
