"""Memory and time against dataset size: ``prepare -> sae -> audit`` at 1x, 4x and 16x the pairs.

What: the three stages as the CLI runs them (``python -m prefsculpt.cli <stage>``, each in its own
process), on planted data of ``--base`` x m pairs for m in ``--multipliers`` (default: the planted
default ``data.planted.n_pairs`` = 1,200 -> 1,200 / 4,800 / 19,200 pairs; ``clean_pairs`` scaled
with it). Each size gets a fresh cache folder and a fresh SQLite MLflow store, so nothing is reused.

Settings, to keep it minutes per size rather than hours (about 50 min for all three on the shared
2-core box under load, 16x being 35 min of it): ``experiment=tiny`` (the tiny
model/SAE/audit groups of conf/*/tiny.yaml: SmolLM2-135M, a TopK SAE trained for 80k tokens),
with a **tiny SAE width** (``sae.expansion=1``: 576 latents, k=16) read at a **shallow layer**
(``--layer``, default 1: the truncated forward runs 2 of the 30 decoder layers; the default
``sae.layer=15`` costs ~8x more per token and changes nothing about memory, which is what this
measures). The token caps stay at their defaults unless ``--max-train-tokens`` is given.

Printed per size: peak RSS of each stage's process (``os.wait4`` rusage of that child: the
kernel's high-water mark of its resident set), wall and CPU seconds per pair over the three
stages, and the ratios 16x / 1x (targets: peak RSS <= 1.5x, seconds per pair <= 1.3x). On a shared
machine wall time is inflated by other processes; CPU seconds are the steadier figure.

    WANDB_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py [--base 1200] [--multipliers 1 4 16]
        [--layer 1] [--out /tmp/prefsculpt-scale] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("prepare", "sae", "audit")
ROOT = Path(__file__).resolve().parents[1]


def default_pairs() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(ROOT / "conf" / "data" / "planted.yaml").planted.n_pairs)


def run_stage(stage: str, overrides: list[str], cwd: Path, log_path: Path) -> dict[str, float]:
    """One stage in a child process: its peak RSS (MB), wall and CPU seconds."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "prefsculpt.cli", stage, *overrides]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{stage} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024.0, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def run_size(n_pairs: int, args: argparse.Namespace) -> dict[str, object]:
    work = Path(args.out) / f"pairs-{n_pairs}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    overrides = [
        "experiment=tiny", f"data.planted.n_pairs={n_pairs}", f"data.planted.clean_pairs={n_pairs // 4}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"cache_dir={work / 'cache'}",
        f"sae.layer={args.layer}", "sae.expansion=1", "sae.k=16", "encode.num_threads=1",
    ]
    if args.max_train_tokens is not None:
        overrides.append(f"sae.max_train_tokens={args.max_train_tokens}")
    stages = {}
    for stage in STAGES:
        stages[stage] = run_stage(stage, overrides, work, work / f"{stage}.log")
        print(f"  {n_pairs:>6} pairs  {stage:<8} peak RSS {stages[stage]['peak_rss_mb']:7.0f} MB  "
              f"wall {stages[stage]['wall_s']:7.1f} s  cpu {stages[stage]['cpu_s']:7.1f} s", flush=True)
    wall = sum(s["wall_s"] for s in stages.values())
    cpu = sum(s["cpu_s"] for s in stages.values())
    if not args.keep:
        shutil.rmtree(work / "cache", ignore_errors=True)
    return {"n_pairs": n_pairs, "stages": stages, "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
            "wall_s_per_pair": wall / n_pairs, "cpu_s_per_pair": cpu / n_pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=int, default=None, help="pairs at 1x (default: data.planted.n_pairs)")
    ap.add_argument("--multipliers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--max-train-tokens", type=int, default=None)
    ap.add_argument("--out", default="/tmp/prefsculpt-scale")
    ap.add_argument("--keep", action="store_true", help="keep each size's cache folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = args.base or default_pairs()
    print(f"prepare -> sae -> audit at {args.multipliers} x {base} pairs (layer {args.layer}, 576 latents); "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    rows = [run_size(base * m, args) for m in args.multipliers]
    print(f"\n{'pairs':>7} {'peak RSS MB':>12} {'wall s/pair':>12} {'cpu s/pair':>11}   per stage peak RSS MB")
    for r in rows:
        per = "  ".join(f"{s} {v['peak_rss_mb']:.0f}" for s, v in r["stages"].items())
        print(f"{r['n_pairs']:>7} {r['peak_rss_mb']:>12.0f} {r['wall_s_per_pair']:>12.4f} {r['cpu_s_per_pair']:>11.4f}   {per}")
    lo, hi = rows[0], rows[-1]
    ratios = {
        "peak_rss": hi["peak_rss_mb"] / lo["peak_rss_mb"],
        "wall_s_per_pair": hi["wall_s_per_pair"] / lo["wall_s_per_pair"],
        "cpu_s_per_pair": hi["cpu_s_per_pair"] / lo["cpu_s_per_pair"],
    }
    m = hi["n_pairs"] // lo["n_pairs"]
    print(f"\n{m}x / 1x: peak RSS {ratios['peak_rss']:.2f} (target <= 1.5: "
          f"{'PASS' if ratios['peak_rss'] <= 1.5 else 'FAIL'}); seconds per pair wall {ratios['wall_s_per_pair']:.2f}, "
          f"cpu {ratios['cpu_s_per_pair']:.2f} (target <= 1.3: {'PASS' if ratios['cpu_s_per_pair'] <= 1.3 else 'FAIL'} on cpu)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "layer": args.layer}, indent=2))


if __name__ == "__main__":
    main()
