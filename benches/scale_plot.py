#!/usr/bin/env python3
"""Draws the control-plane scale runs (the JSON lines `sim-scale --json FILE` writes) as one PNG.

    cargo build --release -p tidepool-sim
    target/release/sim-scale --nodes 10,100,1000 --json runs.jsonl   # several times, appending
    python3 benches/scale_plot.py benches/control_scale.jsonl benches/control_scale.png

Several runs of one size are reduced to their median per value; the script also prints those
medians as the Markdown table BENCHMARKS.md section 8 shows. Needs matplotlib (PyPI).
Left: the leader's core time per tick (median and 99th percentile, steady state) and the
longest placement after a membership change, against the 100 ms tick and the 2 s lease.
Middle: lease grants per second at the leader (steady) and Raft entries per second (join wave).
Right: virtual time until every shard is served after killing 1 % of the nodes, until a 10 %
join wave has settled, and for one rolling-restart round of 1 %.
"""
import json
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    runs = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                runs[r["nodes"]].append(r)
    return dict(sorted(runs.items()))


def value(runs, phase, key, scale=1.0):
    """Median over the runs of one size of `key` in `phase` (None where a run lacks it)."""
    out = []
    for reports in runs.values():
        vals = []
        for r in reports:
            for p in r["phases"]:
                if p["name"] == phase and p.get(key) is not None and p.get("done", True):
                    vals.append(p[key] * scale)
        out.append(statistics.median(vals) if vals else None)
    return out


def fmt(v, unit=""):
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 100:
        return f"{int(v)}{unit}"
    if v >= 100:
        return f"{v:,.0f}{unit}".replace(",", " ")
    if v >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2g}{unit}"


def table(runs):
    """The medians as Markdown rows, one column per cluster size."""
    nodes = list(runs)
    med = lambda key: [statistics.median(r[key] for r in reports) for reports in runs.values()]
    rows = [
        ("nodes (shards)", [f"{n:,} ({n * 16:,})".replace(",", " ") for n in nodes]),
        ("lease renewals / grants per s at the leader (steady)",
         [f"{fmt(a)} / {fmt(b)}" for a, b in zip(value(runs, "steady", "renewals_per_s"), value(runs, "steady", "grants_per_s"))]),
        ("map size (JSON, as snapshotted)", [fmt(b / 1024, " kB") for b in med("map_bytes")]),
        ("leader tick, median / p99 (steady)",
         [f"{fmt(a / 1e3, ' ms')} / {fmt(b / 1e3, ' ms')}" for a, b in zip(value(runs, "steady", "tick_us_median"), value(runs, "steady", "tick_us_p99"))]),
        ("leader tick, median (join wave)", [fmt(a / 1e3, " ms") for a in value(runs, "join 10%", "tick_us_median")]),
        ("one placement after a membership change", [fmt(a, " ms") for a in value(runs, "join 10%", "placement_ms_max")]),
        ("leader core share of one CPU (steady / join wave)",
         [f"{fmt(a * 100, ' %')} / {fmt(b * 100, ' %')}" for a, b in zip(value(runs, "steady", "leader_core_share"), value(runs, "join 10%", "leader_core_share"))]),
        ("Raft entries / s: bootstrap / kill / join / restart",
         [" / ".join(fmt(v) for v in vs) for vs in zip(*(value(runs, p, "raft_entries_per_s") for p in ["bootstrap", "kill 1%", "join 10%", "restart round 1"]))]),
        ("kill 1 %: moved (ideal), every shard served again after",
         [f"{fmt(m)} ({fmt(i)}), {fmt(t / 1e3, ' s')}" for m, i, t in zip(value(runs, "kill 1%", "moved"), value(runs, "kill 1%", "ideal_moves"), value(runs, "kill 1%", "served_after_ms"))]),
        ("join 10 %: moved (ideal), settled after",
         [f"{fmt(m)} ({fmt(i)}), {fmt(t / 1e3 if t else None, ' s')}" for m, i, t in zip(value(runs, "join 10%", "moved"), value(runs, "join 10%", "ideal_moves"), value(runs, "join 10%", "served_after_ms"))]),
        ("rolling restart, one round of 1 %: moved (ideal), settled after",
         [f"{fmt(m)} ({fmt(i)}), {fmt(t / 1e3 if t else None, ' s')}" for m, i, t in zip(value(runs, "restart round 1", "moved"), value(runs, "restart round 1", "ideal_moves"), value(runs, "restart round 1", "served_after_ms"))]),
        ("one node's scan of the map per map change", [fmt(a, " µs") for a in med("node_scan_us")]),
    ]
    out = ["| " + rows[0][0] + " | " + " | ".join(rows[0][1]) + " |", "|---" * (len(nodes) + 1) + "|"]
    for name, cells in rows[1:]:
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(src, dst):
    runs = load(src)
    nodes = list(runs)
    print(table(runs))
    fig, ax = plt.subplots(1, 3, figsize=(17, 5))

    a = ax[0]
    a.plot(nodes, value(runs, "steady", "tick_us_median", 1e-3), "o-", label="tick, median")
    a.plot(nodes, value(runs, "steady", "tick_us_p99", 1e-3), "s--", label="tick, p99")
    a.plot(nodes, value(runs, "join 10%", "placement_ms_max"), "^-", label="one placement")
    a.axhline(100, color="grey", ls=":", label="100 ms tick")
    a.axhline(2000, color="red", ls=":", label="2 s lease")
    a.set(xscale="log", yscale="log", xlabel="nodes (16 shards each)", ylabel="ms of leader CPU",
          title="Leader work per tick")
    a.legend()

    a = ax[1]
    a.plot(nodes, value(runs, "steady", "grants_per_s"), "o-", label="lease grants/s (steady)")
    a.plot(nodes, value(runs, "join 10%", "raft_entries_per_s"), "s-", label="Raft entries/s (join wave)")
    a.plot(nodes, value(runs, "kill 1%", "raft_entries_per_s"), "^-", label="Raft entries/s (kill 1 %)")
    a.set(xscale="log", yscale="log", xlabel="nodes", ylabel="per second", title="Leader load")
    a.legend()

    a = ax[2]
    a.plot(nodes, value(runs, "kill 1%", "served_after_ms", 1e-3), "o-", label="kill 1 %: all served")
    a.plot(nodes, value(runs, "join 10%", "served_after_ms", 1e-3), "s-", label="join 10 %: settled")
    a.plot(nodes, value(runs, "restart round 1", "served_after_ms", 1e-3), "^-", label="restart round (1 %)")
    a.set(xscale="log", yscale="log", xlabel="nodes", ylabel="seconds (virtual)", title="Time to recover")
    a.legend()

    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: scale_plot.py RUNS.jsonl OUT.png")
    main(sys.argv[1], sys.argv[2])
