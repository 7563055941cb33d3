#!/usr/bin/env python3
"""Runs every Tidepool bench binary several times and prints the median of the medians.

    python3 benches/run.py                 # 3 runs of each bench
    python3 benches/run.py --runs 5 decode # 5 runs of one variant (see VARIANTS)

For each run it reads criterion's median point estimate of every benchmark
(target/criterion/**/new/estimates.json) and the RESULT numbers the benches log
(p50/p99 and fixed passes), then reports the median across runs, the derived rates
and the ratios against each peer. The summary also goes to
target/tidepool-bench/summary.json. Nothing here asserts a timing.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
OUT = TARGET / "tidepool-bench"

# name -> (bench target, cargo feature flags, extra env, criterion filter).
# messaging links ractor_cluster, which cannot share a build with tidepool-actors (`node`);
# tensor and decode need neither, so they build without tidepool-actors.
NO_ACTORS = ["--no-default-features"]
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}
VARIANTS = {
    "messaging": ("messaging", NO_ACTORS + ["--features", "ractor-cluster"], {}, None),
    "tensor": ("tensor", NO_ACTORS, {}, None),
    # Diagnostic: the same transfer with glibc's mmap/trim thresholds fixed high, so freed
    # 4 MiB buffers are reused instead of being unmapped and faulted in again.
    "tensor-malloc-tuned": ("tensor", NO_ACTORS, MALLOC_TUNED, "tensor/4MiB_acked/(tidepool|quinn_raw)"),
    "decode": ("decode", NO_ACTORS, {}, None),
    "local": ("local", [], {}, None),
    "storage": ("storage", NO_ACTORS, {}, None),
}
MIB4 = 4 * 1024 * 1024


def criterion_medians(bench, since):
    """{"group/function": median ns per iteration} for the groups of one bench written after
    `since` (older directories are benchmarks that were renamed or filtered out)."""
    found = {}
    for meta in (TARGET / "criterion").glob("**/new/benchmark.json"):
        if (meta.parent / "estimates.json").stat().st_mtime < since:
            continue
        info = json.loads(meta.read_text())
        if not info["group_id"].startswith(bench + "/"):
            continue
        est = json.loads((meta.parent / "estimates.json").read_text())
        found[f'{info["group_id"]}/{info["function_id"]}'] = est["median"]["point_estimate"]
    return found


def run_once(variant, i):
    bench, flags, env, filt = VARIANTS[variant]
    out = OUT / f"run-{variant}-{i}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    cmd = ["cargo", "bench", "-p", "tidepool-benches", *flags, "--bench", bench]
    if filt:
        cmd += ["--", filt]
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print("$", shown, " ".join(cmd), f"(run {i + 1})", file=sys.stderr, flush=True)
    log = out / "log.txt"
    started = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **env, "TIDEPOOL_BENCH_OUT": str(out)})
    if done.returncode != 0:
        # Keep the other runs: a failed build or bench shows up as missing numbers.
        print(f"  failed with {done.returncode}; see {log}", file=sys.stderr, flush=True)
        return {}
    numbers = {f"criterion:{k}": v for k, v in criterion_medians(bench, started).items()}
    if filt:
        keep = re.compile(filt)
        numbers = {k: v for k, v in numbers.items() if keep.search(k)}
    res = out / "results.jsonl"
    if res.exists():
        for line in res.read_text().splitlines():
            r = json.loads(line)
            numbers[f'result:{r["key"]}'] = r["value"]
    prefix = "" if variant == bench else variant + "|"
    return {prefix + k: v for k, v in numbers.items()}


def derive(m, prefix=""):
    """Rates and ratios from the medians (ns per iteration unless the key says otherwise)."""
    d = {}
    c = lambda k: m.get(prefix + "criterion:" + k)
    r = lambda k: m.get(prefix + "result:" + k)
    tp, rc = c("messaging/throughput_256_in_flight/tidepool_quic_mtls"), c("messaging/throughput_256_in_flight/ractor_cluster_tcp")
    if tp and rc:
        d["messaging.tidepool_msgs_per_s"] = 1e9 / tp
        d["messaging.ractor_cluster_msgs_per_s"] = 1e9 / rc
        d["messaging.throughput_ratio"] = rc / tp
    tr, rr = c("messaging/rtt/tidepool_quic_mtls"), c("messaging/rtt/ractor_cluster_tcp")
    if tr and rr:
        d["messaging.rtt_median_ratio_tidepool_over_ractor"] = tr / rr
    for q in ("p50", "p99"):
        a, b = r(f"tidepool_quic_mtls.rtt_{q}_us"), r(f"ractor_cluster_tcp.rtt_{q}_us")
        if a and b:
            d[f"messaging.rtt_{q}_ratio_tidepool_over_ractor"] = a / b
    t, q = c("tensor/4MiB_acked/tidepool"), c("tensor/4MiB_acked/quinn_raw")
    if t and q:
        d["tensor.tidepool_gb_per_s"] = MIB4 / t
        d["tensor.quinn_raw_gb_per_s"] = MIB4 / q
        d["tensor.ratio"] = q / t
        clone = c("tensor/4MiB_acked/envelope_clone")
        if clone:
            d["tensor.ratio_without_bench_clone"] = q / (t - clone)
    a, p, b = c("decode/1M_f32/tidepool_decode_access"), c("decode/1M_f32/postcard"), c("decode/1M_f32/bincode2")
    if a and p and b:
        d["decode.tidepool_over_postcard"] = a / p
        d["decode.tidepool_over_bincode"] = a / b
        v = c("decode/1M_f32/tidepool_validate_only")
        if v:
            d["decode.validate_only_over_postcard"] = v / p
        w = c("decode/1M_f32/tidepool_from_wire_access")
        if w:
            d["decode.from_wire_over_postcard"] = w / p
    rcall, rcast = c("local/incr/ractor_call"), c("local/incr/ractor_cast")
    for row in ("tidepool_incr_memory_store", "tidepool_incr_file_store", "tidepool_get"):
        t = c("local/incr/" + row)
        if t and rcall:
            d[f"local.{row}_over_ractor_call"] = t / rcall
        if t and rcast:
            d[f"local.{row}_over_ractor_cast"] = t / rcast
    for group in ("append_4KiB", "put_4KiB_memory", "checkpoint_put_4MiB", "checkpoint_get_4MiB"):
        sealed, unsealed = c(f"storage/{group}/sealed"), c(f"storage/{group}/unsealed")
        if sealed and unsealed:
            d[f"storage.{group}.sealed_over_unsealed"] = sealed / unsealed
            d[f"storage.{group}.sealed_per_s"] = 1e9 / sealed
            d[f"storage.{group}.unsealed_per_s"] = 1e9 / unsealed
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--rederive", action="store_true",
                    help="recompute medians and ratios from the saved summary.json, run nothing")
    args = ap.parse_args()
    runs = {}
    per_run = [dict() for _ in range(args.runs)]
    if args.rederive:
        per_run = json.loads((OUT / "summary.json").read_text())["per_run_numbers"]
        for numbers in per_run:
            for k, v in numbers.items():
                runs.setdefault(k, []).append(v)
    else:
        for variant in args.variants:
            for i in range(args.runs):
                for k, v in run_once(variant, i).items():
                    runs.setdefault(k, []).append(v)
                    per_run[i][k] = v
    medians = {k: statistics.median(v) for k, v in runs.items()}
    # Ratios are taken within each run (Tidepool and its peer measured minutes apart at most),
    # then the median across runs.
    derived_runs = {}
    for numbers in per_run:
        d = derive(numbers)
        d.update({"tensor-malloc-tuned|" + k: v for k, v in derive(numbers, "tensor-malloc-tuned|").items()})
        for k, v in d.items():
            derived_runs.setdefault(k, []).append(v)
    derived = {k: statistics.median(v) for k, v in derived_runs.items()}
    summary = {"runs": args.runs, "per_run": runs, "per_run_numbers": per_run, "median": medians,
               "derived_per_run": derived_runs, "derived": derived}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    for k in sorted(runs):
        vals = ", ".join(f"{v:.4g}" for v in runs[k])
        print(f"{k:70s} median {medians[k]:12.5g}   runs [{vals}]")
    for k, v in derived.items():
        vals = ", ".join(f"{x:.4g}" for x in derived_runs[k])
        print(f"{k:70s} median {v:12.5g}   runs [{vals}]")


if __name__ == "__main__":
    main()
