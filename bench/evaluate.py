"""Benchmark: one policy's full evaluation on default settings (SmolLM2-135M) against 4 minutes.

Reported: wall time and the process's CPU time (user + system, all threads); on a shared box the
wall time depends on other jobs, CPU time / 2 is what 2 free cores would take (the process uses 2
threads and is compute bound).

Baseline: the issue's target, **240 s** of wall time on 2 CPU cores for one policy, with the base
already cached (the base is evaluated once per model digest and inputs, then reused by every policy).

What runs: ``run_evaluate`` with ``conf/eval/default.yaml`` (100 planted sycophancy probes, 40 style
prompts x 64 greedy tokens, 100 clean pairs, 100 known-answer probes, KL on the style rollouts,
concept shift over top-20 + 20 random latents). Two runs in one tracking store:

1. ``policy=base`` with an empty cache: the base itself (fills the base cache);
2. ``policy=<folder>``: a different policy (``--policy``; default: SmolLM2 with its top 4 layers
   perturbed by seeded noise, saved once to ``$PREFSCULPT_CACHE/bench/policy-perturbed``), base cached.

The concept shift needs an SAE and audit hypotheses: unless ``--sae``/``--hypotheses`` are given, a
random sae-lens SAE (8x expansion at ``sae.layer``) and 20 synthetic hypotheses stand in (the cost is
the same; the figures are meaningless).

    python bench/evaluate.py [--policy DIR] [--sae DIR --hypotheses FILE] [--overrides "eval.x=y ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_S = 240.0


def perturbed_policy(base_dir: Path, out: Path, top_layers: int = 4, scale: float = 0.02) -> Path:
    """SmolLM2 with seeded noise (scale x each weight's std) on its top layers: a stand-in policy."""
    import torch

    from prefsculpt.models.loading import load_model, load_tokenizer

    if (out / "config.json").exists():
        return out
    model = load_model(base_dir)
    g = torch.Generator().manual_seed(0)
    n = len(model.model.layers)
    with torch.no_grad():
        for layer in model.model.layers[n - top_layers :]:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    load_tokenizer(base_dir).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def stand_in_shift_sources(root: Path, d_model: int, expansion: int = 8, n_hyp: int = 20) -> tuple[Path, Path]:
    import numpy as np
    import pandas as pd
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae_dir = root / "sae"
    StandardSAE(StandardSAEConfig(d_in=d_model, d_sae=expansion * d_model)).save_model(sae_dir)
    rng = np.random.default_rng(0)
    lat = rng.choice(expansion * d_model, size=n_hyp, replace=False)
    hyp = pd.DataFrame({"concept": [f"latent:{j}" for j in lat], "rank": np.arange(1, n_hyp + 1),
                        "d_z": rng.normal(0, 0.5, n_hyp)})
    path = root / "hypotheses.parquet"
    hyp.to_parquet(path)
    return sae_dir, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--hypotheses", default=None)
    ap.add_argument("--overrides", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; on a shared box use 1: with 2 threads and other jobs on the cores, "
                         "OpenMP spin-waits inflate both wall and CPU time several-fold")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from prefsculpt.cli import setup_logging
    from prefsculpt.config import compose, parse_overrides
    from prefsculpt.core.paths import cache_root
    from prefsculpt.models.loading import resolve_model_dir
    from prefsculpt.stages.evaluate import run_evaluate

    setup_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    base_dir = resolve_model_dir("smollm2-135m-instruct")
    policy = Path(args.policy) if args.policy else perturbed_policy(base_dir, cache_root() / "bench" / "policy-perturbed")
    d_model = json.loads((base_dir / "config.json").read_text())["hidden_size"]
    sae, hyp = (args.sae, args.hypotheses) if args.sae else stand_in_shift_sources(work, d_model)
    common = [f"cache_dir={work / 'cache'}", f"eval.shift.sae_path={sae}", f"eval.shift.hypotheses_path={hyp}",
              *parse_overrides(args.overrides)]
    results = {}
    for name, pol in (("base (cold cache)", "base"), ("policy (base cached)", str(policy))):
        cfg = compose([*common, f"eval.policy={pol}"])
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_evaluate(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        parts = {k.removeprefix("time/").removesuffix("_s"): round(v, 1) for k, v in out["metrics"].items()
                 if k.startswith("time/") and k != "time/total_s"}
        results[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **parts}
        print(f"{name:22s} wall {wall:6.1f} s  cpu {cpu:6.1f} s{'' if args.threads == 1 else f' (= {cpu / 2:.1f} s of 2 free cores)'}   " + "  ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    r = results["policy (base cached)"]
    pol_s, ideal = r["wall_s"], r["cpu_s"] / (1 if args.threads == 1 else 2)
    print(f"one policy's full evaluation: wall {pol_s:.1f} s vs target {TARGET_S:.0f} s: "
          f"{'PASS' if pol_s < TARGET_S else 'FAIL'}; process CPU {r['cpu_s']:.1f} s, i.e. {ideal:.1f} s on "
          f"{'1 free core' if args.threads == 1 else '2 uncontended cores'}: {'PASS' if ideal < TARGET_S else 'FAIL'} (wall exceeds CPU/2 when other jobs share the cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
