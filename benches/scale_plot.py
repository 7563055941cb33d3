#!/usr/bin/env python3
"""Draws the control-plane scale table (the CSV `control_scale` prints) as one PNG.

    cargo run --release -p tidepool-core --example control_scale > benches/control_scale.csv
    python3 benches/scale_plot.py benches/control_scale.csv benches/control_scale.png

Needs matplotlib (PyPI). Left: the leader's core time per tick under the lock that grants take
(median and worst), and one placement computation after a membership change (off that lock, but
crash reassignments wait for it), against the 100 ms tick and the 2 s lease. Right: lease grants and Raft entries per second at the leader.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    n = [int(r["nodes"]) for r in rows]
    med = [max(float(r["tick_us_median"]), 1.0) / 1000.0 for r in rows]
    worst = [max(float(r["tick_us_max"]), 1.0) / 1000.0 for r in rows]
    place = [max(float(r["placement_ms_median"]), 0.001) for r in rows]
    grants = [float(r["grants_per_s"]) for r in rows]
    entries = [float(r["entries_per_s_roll"]) for r in rows]
    joins = [float(r["entries_per_s_join"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.loglog(n, med, "o-", label="median tick (ms)")
    a.loglog(n, worst, "s--", label="worst tick (ms)")
    a.loglog(n, place, "^-.", label="placement after a change, off the lock (ms, median)")
    a.axhline(100.0, color="grey", lw=0.8, ls=":", label="tick period, 100 ms")
    a.axhline(2000.0, color="red", lw=0.8, ls=":", label="lease TTL, 2 s")
    a.set_xlabel("nodes (shards = 16 x nodes)")
    a.set_ylabel("leader core time (ms)")
    a.legend(fontsize=8)
    a.set_title("Leader core time")
    b.loglog(n, grants, "o-", label="lease grants / s")
    b.loglog(n, joins, "s--", label="Raft entries / s (10 % join wave)")
    b.loglog(n, entries, "^:", label="Raft entries / s (rolling restart)")
    b.set_xlabel("nodes")
    b.legend(fontsize=8)
    b.set_title("Load on the leader")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
