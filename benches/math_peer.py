"""scikit-learn's L-BFGS logistic regression on the rows `tidepool bench math --dump` wrote:
rows x passes per second (passes: L-BFGS iterations), on one thread and on every core.

Usage: math_peer.py ROWS_FILE ROWS FEATURES [RUNS]
"""
import json
import os
import sys
import time

import numpy as np


def fit(x, y, threads):
    from threadpoolctl import threadpool_limits
    from sklearn.linear_model import LogisticRegression

    with threadpool_limits(limits=threads):
        model = LogisticRegression(solver="lbfgs", max_iter=100, tol=1e-8, C=1e4)
        t = time.perf_counter()
        model.fit(x, y)
        seconds = time.perf_counter() - t
    iters = int(model.n_iter_[0])
    return {"threads": threads, "seconds": seconds, "iterations": iters,
            "rows_x_passes_per_sec": len(y) * iters / seconds}


def main():
    path, rows, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    raw = np.fromfile(path, dtype="<f4")
    x = raw[: rows * d].reshape(rows, d)
    y = raw[rows * d : rows * d + rows]
    out = {"rows": rows, "features": d, "runs": []}
    for threads in (1, os.cpu_count()):
        for _ in range(runs):
            out["runs"].append(fit(x, y, threads))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
