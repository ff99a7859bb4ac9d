"""The GPU check (issue 14): the tiny pipeline, then one epoch of plain and of shaped DPO on
SmolLM2-135M-Instruct, with pairs/s set against the CPU figures of this same script.

    bash bench/gpu_check.sh          # device=cuda: the planted train split (960 pairs), bf16-mixed
    bash bench/gpu_check.sh --cpu    # device=cpu: the same steps on 32 pairs, 32-true

Everything runs through the real stages (``prefsculpt.cli.run_stage``) in a fresh tracking store
and cache under a temporary folder. DPO: full fine-tune (``train.train_top_layers=null``), batch 8
pairs, ``max_length`` 256, ``train.precision=auto`` (bf16-mixed on a bf16 GPU, 32-true on the CPU);
shaped = ``shaping=tiny`` (reward shaping of the ``named:stock_flattery`` regex concept). Pairs/s
are the train stage's own figures: ``fit`` = pairs / Lightning fit seconds, ``with precompute`` adds
the one-off reference pass. The CPU figures are read from ``bench/gpu_check_cpu.json`` (written by
``--cpu``); results go to ``$OUT`` (the device tool's folder) or ``bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = {"cuda": 960, "cpu": 32}
DPO = ["train.train_top_layers=null", "train.batch_size=8", "train.max_length=256", "train.epochs=1",
       "train.precision=auto", "train.log_model=false", "train.checkpoint_every_n_steps=1000"]


def stage(name: str, overrides: list[str]) -> tuple[dict, float]:
    from prefsculpt.cli import run_stage

    t0 = time.perf_counter()
    out = run_stage(name, overrides)
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with fewer pairs")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the DPO epochs")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run with --cpu", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="prefsculpt-gpu-check-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    common = [f"device={device}", f"cache_dir={work / 'cache'}"]
    res: dict = {"device": device, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "pairs": PAIRS[device]}
    if not args.skip_pipeline:
        out, wall = stage("main", ["experiment=tiny", *common, f"search.storage=sqlite:///{work / 'optuna.db'}"])
        res["tiny_pipeline_s"] = wall
        res["tiny_pipeline_promote_run"] = out.get("stages", {}).get("promote")
        print(f"tiny pipeline ({device}): {wall:.1f} s", flush=True)
    for name, extra in (("plain", ["shaping.concepts=[]"]), ("shaped", ["shaping=tiny"])):
        out, wall = stage("train", [*common, *DPO, f"train.max_pairs={PAIRS[device]}", *extra])
        m = out["metrics"]
        n = PAIRS[device]
        pre = wall - m["train/fit_s"]
        res[name] = {"wall_s": wall, "fit_s": m["train/fit_s"], "pairs_per_s_fit": m["train/pairs_per_s"],
                     "pairs_per_s_with_precompute": n / (m["train/fit_s"] + pre), "optimizer_steps": out["optimizer_steps"]}
        print(f"{name} DPO ({device}, {n} pairs): {m['train/pairs_per_s']:.2f} pairs/s fit, "
              f"{res[name]['pairs_per_s_with_precompute']:.2f} pairs/s with the stage's other work, "
              f"wall {wall:.1f} s", flush=True)
    cpu_file = HERE / "gpu_check_cpu.json"
    if device == "cuda" and cpu_file.exists():
        cpu = json.loads(cpu_file.read_text())
        for name in ("plain", "shaped"):
            g, c = res[name]["pairs_per_s_fit"], cpu[name]["pairs_per_s_fit"]
            print(f"{name}: {g:.2f} pairs/s on {res['gpu']} vs {c:.2f} on the CPU ({g / c:.1f}x)")
    out_dir = Path(os.environ.get("OUT") or HERE)
    target = out_dir / f"gpu_check_{device}.json"
    target.write_text(json.dumps(res, indent=2) + "\n")
    print(f"figures written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
