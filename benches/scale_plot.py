#!/usr/bin/env python3
"""Draws the control-plane scale table (the CSV `control_scale` prints) as one PNG.

    cargo run --release -p tidepool-core --example control_scale > benches/control_scale.csv
    python3 benches/scale_plot.py benches/control_scale.csv benches/control_scale.png

Needs matplotlib (PyPI). Left: the leader's CPU time per tick and its share of one core
(log-log, against the cluster size). Right: Raft entries per second and grants per second.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    n = [int(r["nodes"]) for r in rows]
    tick = [max(float(r["tick_us_median"]), 1.0) / 1000.0 for r in rows]
    share = [float(r["leader_cpu_share"]) * 100.0 for r in rows]
    grants = [float(r["grants_per_s"]) for r in rows]
    entries = [float(r["entries_per_s_join"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.loglog(n, tick, "o-", label="leader core time per tick (ms, median)")
    a.loglog(n, share, "s--", label="share of one core (%)")
    a.axhline(100.0, color="grey", lw=0.8, ls=":")
    a.axhline(50.0, color="red", lw=0.8, ls=":", label="budget: 50 % of a core")
    a.set_xlabel("nodes (shards = 16 x nodes)")
    a.legend(fontsize=8)
    a.set_title("Leader cost per tick (100 ms ticks)")
    b.loglog(n, grants, "o-", label="lease grants / s")
    b.loglog(n, entries, "s--", label="Raft entries / s (join wave)")
    b.set_xlabel("nodes")
    b.legend(fontsize=8)
    b.set_title("Load on the leader")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
