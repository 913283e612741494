"""The one-screen summary of bench/gpu/run.sh: tests per file, kernel bandwidth vs the device's copy bandwidth,
attention vs SDPA's flash backend, the 1B run's tokens/s and MFU. Standard library only; a missing or partial
input (a step that failed or was stopped at its limit) prints what there is and says what is missing.

    python3 bench/gpu/summary.py --junit tests.xml --bench bench.json --train train-1b.txt --env env.txt
"""

import argparse
import json
import re
import statistics
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def outcomes_per_file(junit: Path) -> list[str]:
    if not junit.is_file():
        return ["  (no JUnit file: the test step did not finish writing it)"]
    counts = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "?").split(".")
        name = "/".join(module[: next((i + 1 for i, m in enumerate(module) if m.startswith("test_")), len(module))])
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        counts[f"{name}.py"][outcome] += 1
    lines = [
        f"  {f:<40}{c['passed']:>5} passed{c['failed']:>5} failed{c['skipped']:>5} skipped" for f, c in counts.items()
    ]
    total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "skipped")}
    lines.append(f"  {'all':<40}{total['passed']:>5} passed{total['failed']:>5} failed{total['skipped']:>5} skipped")
    return lines


def bench_rows(bench: Path) -> list[dict]:
    if not bench.is_file():
        return []
    try:
        return [
            dict(b.get("extra_info", {}), group=b.get("group") or "")
            for b in json.loads(bench.read_text())["benchmarks"]
        ]
    except (json.JSONDecodeError, KeyError):
        return []


def kernels(rows: list[dict]) -> list[str]:
    lines = [
        f"  {r['group']:<52}{r['fraction_of_copy']:>6.2f} of copy ({r['gbps']:.0f} of {r['copy_gbps']:.0f} GB/s)"
        for r in rows
        if r.get("impl") == "pytrain" and r.get("device", "").startswith("cuda") and "fraction_of_copy" in r
    ]
    return lines or ["  (no CUDA bandwidth rows in the benchmark JSON)"]


def attention(rows: list[dict]) -> list[str]:
    groups = defaultdict(dict)
    for r in rows:
        if r.get("group", "").startswith("attention") and "ms" in r and r.get("device", "").startswith("cuda"):
            groups[r["group"]][r["impl"]] = r
    lines = []
    for group, impls in groups.items():
        ours, flash = impls.get("pytrain"), impls.get("sdpa_flash") or impls.get("sdpa")
        if ours is None:
            continue
        if flash is None:
            lines.append(f"  {group:<60} pytrain {ours['ms']:.3f} ms (no SDPA row)")
            continue
        lines.append(
            f"  {group:<60} pytrain {ours['ms']:8.3f} ms {ours['tflops']:6.1f} TFLOP/s | {flash['impl']} "
            f"{flash['ms']:8.3f} ms | {flash['ms'] / ours['ms']:.2f}x"
        )
    return lines or ["  (no CUDA attention rows in the benchmark JSON)"]


STEP = re.compile(r"^step (\d+)/\d+ .*\| tgs ([\d,.]+) .*\| mfu ([\d.]+)%")


def training(train: Path) -> list[str]:
    steps = [STEP.match(line) for line in (train.read_text().splitlines() if train.is_file() else [])]
    steps = [(int(m[1]), float(m[2].replace(",", "")), float(m[3])) for m in steps if m]
    if not steps:
        return ["  (no step lines: see train-1b.txt)"]
    timed = [s for s in steps if s[0] > 2] or steps  # the first steps compile and autotune
    return [
        f"  {len(steps)} steps; median over steps {timed[0][0]}..{timed[-1][0]}: "
        f"{statistics.median(s[1] for s in timed):,.0f} tokens/s per GPU, MFU {statistics.median(s[2] for s in timed):.1f}%"
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("junit", "bench", "train", "env"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args(argv)
    env = args.env.read_text().splitlines() if args.env.is_file() else []
    rows = bench_rows(args.bench)
    sections = [
        ("device", [f"  {line}" for line in env if line.startswith(("GPU ", "gpus:", "3.", "Build cuda"))] or ["  ?"]),
        ('tests (-m "cuda or triton"), per file', outcomes_per_file(args.junit)),
        ("kernels (pytrain, CUDA): achieved bandwidth as a fraction of the device's copy bandwidth", kernels(rows)),
        (
            "attention: pytrain (Triton) vs SDPA's flash backend, same inputs (x: SDPA time / pytrain time)",
            attention(rows),
        ),
        ("1B run (configs/1B.py, one GPU)", training(args.train)),
    ]
    for title, lines in sections:
        print(f"== {title}")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
