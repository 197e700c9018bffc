#!/usr/bin/env python3
"""Turn a directory of fio JSON results into the markdown report of benches/run.sh.

    benches/summarize.py DIR [--out FILE]

DIR holds one fio JSON per run, named ROUND-PROFILE-SYSTEM.json (e.g. 2-P3-nbdkit.json),
and optionally meta.md (machine facts and command, printed first) and failures.txt
(runs that failed, listed after the table). Everything else is ignored, so this can be
rerun on a directory kept with `run.sh --keep DIR`.

Per profile and system the table shows the median over rounds of IOPS (4k profiles) or
MiB/s (1M profiles) with the min-max spread, the medians of the p50 and p99 completion
latency (fio clat) in microseconds, and the ratio of tether's median to each peer's.
Medians with the spread, because on these shared 2-core machines single runs vary by
15-25 % (BENCHMARKS.md).
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

# profile -> (fio direction, what is reported)
PROFILES = {
    "P1": ("write", "IOPS"),
    "P2": ("write", "IOPS"),
    "P3": ("read", "IOPS"),
    "P4": ("write", "MiB/s"),
    "P5": ("read", "MiB/s"),
    "P6": ("write", "IOPS"),
}
SYSTEM_ORDER = ["tether1", "tether1-enc", "tether1-net", "tether1-tls", "tether1-prev",
                "tether3", "tether3-sec", "tether3-net", "tether3-sec-net", "tether3-grpc",
                "tether3-sec-grpc", "tether3-prev",
                "qemu-nbd", "nbdkit", "nbd-server"]
TETHERS = ["tether1", "tether1-net", "tether3"]
PEERS = ["qemu-nbd", "nbdkit", "nbd-server"]
NAME_RE = re.compile(r"^(\d+)-(P\d+)-([A-Za-z0-9_.-]+)\.json$")


def percentile_us(lat, key):
    """A clat/lat percentile in µs, or None when fio recorded no I/O."""
    value = (lat or {}).get("percentile", {}).get(key)
    return None if value is None else value / 1000.0


def parse_run(path, profile):
    """One fio JSON -> dict(value, p50, p99, flush_p50, flush_p99) or None (with a warning)."""
    try:
        data = json.loads(path.read_text())
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as err:
        print(f"warning: {path.name}: not a fio JSON result ({err}); skipped", file=sys.stderr)
        return None
    if job.get("error"):
        print(f"warning: {path.name}: fio reported error {job['error']}; skipped", file=sys.stderr)
        return None
    direction, unit = PROFILES.get(profile, (None, "IOPS"))
    if direction is None:  # unknown profile: whichever direction did the I/O
        direction = max(("read", "write"), key=lambda d: job[d].get("total_ios", 0))
    side = job[direction]
    if not side.get("total_ios"):
        print(f"warning: {path.name}: no {direction} I/O recorded; skipped", file=sys.stderr)
        return None
    value = side["iops"] if unit == "IOPS" else side["bw_bytes"] / 2**20
    sync = job.get("sync", {})
    return {
        "value": value,
        "p50": percentile_us(side.get("clat_ns"), "50.000000"),
        "p99": percentile_us(side.get("clat_ns"), "99.000000"),
        # With --fsync=1 (P6) each write is followed by NBD_CMD_FLUSH; its latency is
        # not in the write clat, so it is reported separately.
        "flush_p50": percentile_us(sync.get("lat_ns"), "50.000000") if sync.get("total_ios") else None,
        "flush_p99": percentile_us(sync.get("lat_ns"), "99.000000") if sync.get("total_ios") else None,
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_num(v):
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def fmt_lat(p50, p99):
    return "–" if p50 is None else f"{fmt_num(p50)} / {fmt_num(p99)}"


def read_failures(results_dir):
    """failures.txt lines "ROUND PROFILE SYSTEM reason..." -> list of (round, profile, system, line)."""
    path = results_dir / "failures.txt"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split(maxsplit=3)
            if len(parts) >= 3 and parts[0].isdigit():
                out.append((int(parts[0]), parts[1], parts[2], line))
    return out


def build_report(results_dir):
    runs = {}  # (profile, system) -> list of parsed runs
    attempted = set()  # (profile, system) with a result file or a recorded failure
    rounds = set()
    for path in sorted(results_dir.iterdir()):
        m = NAME_RE.match(path.name)
        if not m:
            continue
        rnd, profile, system = int(m.group(1)), m.group(2), m.group(3)
        rounds.add(rnd)
        attempted.add((profile, system))
        parsed = parse_run(path, profile)
        if parsed:
            runs.setdefault((profile, system), []).append(parsed)
    failures = read_failures(results_dir)
    for rnd, profile, system, _ in failures:
        rounds.add(rnd)
        attempted.add((profile, system))

    lines = []
    meta = results_dir / "meta.md"
    if meta.is_file():
        lines += [meta.read_text().rstrip(), ""]
    if attempted:
        lines += table(runs, attempted, len(rounds))
    else:
        lines.append("No results found.")
    if failures:
        lines += ["", "Failed runs (not in the table):", ""]
        lines += [f"- {line}" for *_, line in failures]
    return "\n".join(lines) + "\n"


def table(runs, attempted, n_rounds):
    """The markdown table and its legend, as a list of lines."""
    lines = []
    profiles = sorted({p for p, _ in attempted}, key=lambda p: int(p[1:]))
    present = {s for _, s in attempted}
    systems = [s for s in SYSTEM_ORDER if s in present] + sorted(present - set(SYSTEM_ORDER))
    ratios = [(t, p) for t in TETHERS if t in present for p in PEERS if p in present]
    # What 3-way replication costs; what encryption and TLS cost, against the same
    # topology without them; what the in-process replica saves; and this build against
    # an older one (--tether-prev), in the same run.
    for a, b in [("tether3", "tether1"), ("tether3-net", "tether1-net"),
                 ("tether1-enc", "tether1"), ("tether1-tls", "tether1-net"),
                 ("tether3-sec", "tether3"), ("tether3-sec-net", "tether3-net"),
                 ("tether1", "tether1-net"), ("tether3", "tether3-net"),
                 ("tether3", "tether3-grpc"), ("tether3-sec", "tether3-sec-grpc"),
                 ("tether1", "tether1-prev"), ("tether3", "tether3-prev")]:
        if a in present and b in present:
            ratios.append((a, b))

    header = ["profile", "unit"]
    for s in systems:
        header += [s, f"{s} p50 / p99 µs"]
    header += [f"{t} / {p}" for t, p in ratios]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    flush_notes = []
    for profile in profiles:
        unit = PROFILES.get(profile, (None, "IOPS"))[1]
        row = [profile, unit]
        medians = {}
        for s in systems:
            rs = runs.get((profile, s), [])
            if not rs:
                row += ["failed" if (profile, s) in attempted else "–", "–"]
                continue
            vals = [r["value"] for r in rs]
            medians[s] = statistics.median(vals)
            cell = f"{fmt_num(medians[s])} ({fmt_num(min(vals))}–{fmt_num(max(vals))})"
            if len(rs) < n_rounds:
                cell += f" n={len(rs)}/{n_rounds}"
            row += [cell, fmt_lat(median(r["p50"] for r in rs), median(r["p99"] for r in rs))]
            f50 = median(r["flush_p50"] for r in rs)
            if f50 is not None:
                flush_notes.append(f"{profile} {s}: {fmt_lat(f50, median(r['flush_p99'] for r in rs))}")
        for t, p in ratios:
            if medians.get(t) and medians.get(p):
                row.append(f"{medians[t] / medians[p]:.2f}×")
            else:
                row.append("–")
        lines.append("| " + " | ".join(row) + " |")

    lines += [
        "",
        f"Cells: median over {n_rounds} round(s) of IOPS or MiB/s, with (min–max); "
        "latency: medians of the per-run p50 / p99 completion latency (fio clat) in µs; "
        "ratios: median over median of IOPS or MiB/s (above 1: the first is faster).",
    ]
    if flush_notes:
        lines += ["", "Flush (NBD_CMD_FLUSH after each write) latency p50 / p99 µs, not included "
                  "in the write latency above: " + "; ".join(flush_notes) + "."]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="directory of ROUND-PROFILE-SYSTEM.json files")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    args = ap.parse_args()
    if not args.dir.is_dir():
        sys.exit(f"{args.dir}: not a directory")
    report = build_report(args.dir)
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
