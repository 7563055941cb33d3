"""The peer of `tidepool bench kmeans`: writes the points (500 000 x 64 float32, 8 Gaussian
blobs from make_blobs, seed 7; column `blob` is the true blob, left out of the features) as
Parquet if absent, then times scikit-learn's KMeans(n_clusters=8, n_init=1, max_iter=50,
tol=1e-4) on them for seeds 1, 2, 3. Prints one JSON document.

    python3 benches/kmeans_peer.py POINTS.parquet
"""

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs


def main():
    path = sys.argv[1]
    if not os.path.exists(path):
        x, y = make_blobs(n_samples=500_000, n_features=64, centers=8, cluster_std=4.0,
                          random_state=7)
        cols = {f"x{j}": x[:, j].astype(np.float32) for j in range(64)}
        cols["blob"] = y.astype(np.float32)
        pq.write_table(pa.table(cols), path, row_group_size=65536)
    t = pq.read_table(path)
    x = np.column_stack([t.column(f"x{j}").to_numpy() for j in range(64)]).astype(np.float32)
    runs = []
    for seed in (1, 2, 3):
        t0 = time.perf_counter()
        km = KMeans(n_clusters=8, n_init=1, max_iter=50, tol=1e-4, random_state=seed).fit(x)
        secs = time.perf_counter() - t0
        runs.append({"seed": seed, "seconds": secs, "inertia": float(km.inertia_),
                     "iterations": int(km.n_iter_)})
        print(f"scikit-learn seed {seed}: {secs:.2f} s, inertia {km.inertia_:.6e}, "
              f"{km.n_iter_} iterations", file=sys.stderr)
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
