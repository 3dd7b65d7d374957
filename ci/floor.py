#!/usr/bin/env python3
"""dds beside its floor, measured in one run: a single brick on one core (1 replica,
64-byte values) against the echo server on the same TCP transport, interleaved
repetitions, median and spread. Prints a markdown table for PERF.md.

    python3 ci/floor.py [--reps 5] [--seconds 3] [--bin target/release/dds]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stdout

def bench(bin, target, cluster, shape, seconds, out):
    cmd = [bin, "bench", "--target", target, "--workload", shape["workload"], "--value-size", "64",
           "--clients", str(shape["clients"]), "--depth", str(shape["depth"]), "--seconds", str(seconds),
           "--warmup", "1", "--json", out]
    if target == "dds":
        cmd += ["--cluster", cluster]
    run(cmd)
    with open(out) as f:
        return json.load(f)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--bin", default="target/release/dds")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        run(["cargo", "build", "--release", "--locked"])
    shapes = [
        {"name": "get, 1 client x depth 1", "workload": "read", "clients": 1, "depth": 1},
        {"name": "put, 1 client x depth 1", "workload": "write", "clients": 1, "depth": 1},
        {"name": "get, 50 clients x depth 1", "workload": "read", "clients": 50, "depth": 1},
        {"name": "get, 50 clients x depth 16", "workload": "read", "clients": 50, "depth": 16},
    ]
    with tempfile.TemporaryDirectory(prefix="dds-floor-") as d:
        cluster = os.path.join(d, "c")
        run([a.bin, "cluster", "up", "--dir", cluster, "--bricks", "1", "--cores", "1"])
        try:
            results = {s["name"]: {"dds": [], "echo": []} for s in shapes}
            for rep in range(a.reps):
                for s in shapes:
                    for target in ("dds", "echo"):
                        r = bench(a.bin, target, cluster, s, a.seconds, os.path.join(d, "r.json"))
                        results[s["name"]][target].append(r)
                print(f"rep {rep + 1}/{a.reps} done", file=sys.stderr)
        finally:
            run([a.bin, "cluster", "down", "--dir", cluster])
    def fmt(xs):
        return f"{statistics.median(xs):,.1f} ({min(xs):,.1f}–{max(xs):,.1f})"
    print(f"| shape | dds ops/s | echo ops/s | ops/s ratio | dds p50 us | echo p50 us | p50 ratio | dds p99 us | echo p99 us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        r = results[s["name"]]
        dt = [x["ops_per_sec"] for x in r["dds"]]; et = [x["ops_per_sec"] for x in r["echo"]]
        dp = [x["p50_us"] for x in r["dds"]]; ep = [x["p50_us"] for x in r["echo"]]
        d9 = [x["p99_us"] for x in r["dds"]]; e9 = [x["p99_us"] for x in r["echo"]]
        tr = [x / y for x, y in zip(dt, et)]; pr = [x / y for x, y in zip(dp, ep)]
        print(f"| {s['name']} | {fmt(dt)} | {fmt(et)} | {statistics.median(tr):.2f} | {fmt(dp)} | {fmt(ep)} | "
              f"{statistics.median(pr):.2f} | {fmt(d9)} | {fmt(e9)} |")

if __name__ == "__main__":
    main()
