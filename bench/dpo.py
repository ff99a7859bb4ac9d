"""prefsculpt's DPO step against TRL 1.16's DPOTrainer on SmolLM2-135M-Instruct.

Same planted pairs, batch 4 pairs, max_length 128 (prompt+response, keep start), fp32, AdamW, full
fine-tune (and, for prefsculpt, also the top 6 layers on a cached trunk). Each mode runs in its own
subprocess so its peak RSS is its own. Pairs/s = batch / median step time over the steps after the
warm-up. prefsculpt's one-off precompute (reference log-probs, trunk) is reported separately and
also folded in over one epoch of the planted train split (960 pairs).

    python bench/dpo.py            # 2 warm-up + 8 timed steps per mode
    python bench/dpo.py --quick    # 1 + 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, MAX_LEN, BETA, LR = 4, 128, 0.1, 5e-6
EPOCH_PAIRS = 960  # planted default train split


def planted_pairs(n: int):
    from prefsculpt.data.planted import PlantedConfig, generate_planted
    from prefsculpt.data.splits import split_pairs

    pairs = generate_planted(PlantedConfig(n_pairs=1200, seed=0))
    return split_pairs(pairs, {"train": 0.8, "validation": 0.1, "test": 0.1})["train"][:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_trl(n_steps: int, warm: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir

    torch.manual_seed(0)
    d = resolve_model_dir("smollm2-135m-instruct")
    tok, model = load_tokenizer(d), load_model(d)
    pairs = planted_pairs(n_steps * BATCH)
    ds = Dataset.from_dict({
        "prompt": [p.messages() for p in pairs],
        "chosen": [[{"role": "assistant", "content": p.chosen}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p.rejected}] for p in pairs],
    })
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, beta=BETA, learning_rate=LR, per_device_train_batch_size=BATCH,
                         max_length=MAX_LEN, bf16=False, gradient_checkpointing=False, use_cpu=True,
                         report_to=[], max_steps=n_steps, save_strategy="no", logging_steps=1000,
                         dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
        toks = [len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in trainer.train_dataset]
        trainer.train()
    return {"step_s": times[warm:], "tokens_per_pair": statistics.mean(toks), "peak_rss_mb": peak_rss_mb()}


def run_ours(n_steps: int, warm: int, top: int | None) -> dict:
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from prefsculpt.data.tokenize import tokenize_pairs
    from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir
    from prefsculpt.shaping.config import ShapingConfig
    from prefsculpt.train.datamodule import PreferenceDataModule, truncate_pair
    from prefsculpt.train.module import PreferenceModule, freeze_below
    from prefsculpt.train.precompute import PrecomputeCache, RefContext, run_precompute, trunk_cache

    torch.manual_seed(0)
    d = resolve_model_dir("smollm2-135m-instruct")
    tok, model = load_tokenizer(d), load_model(d).eval()
    pairs = planted_pairs(n_steps * BATCH)
    toks = [truncate_pair(t, MAX_LEN) for t in tokenize_pairs(pairs, tok, 256, 256)]
    keep = [i for i, t in enumerate(toks) if t is not None]
    pairs, toks = [pairs[i] for i in keep], [toks[i] for i in keep]
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = PrecomputeCache(cache_dir)
        t0 = time.perf_counter()
        ctx = RefContext(model, tok, pairs, toks, OmegaConf.structured(ShapingConfig), [], None, 256)
        start = freeze_below(model, top)
        ctx.trunk_layer = start - 1 if start else None  # one forward gives the reference and the trunk
        pre = run_precompute(ctx, [], cache, "bench")
        trunk = trunk_cache(ctx, start, cache, "bench") if start else None
        pre_s = time.perf_counter() - t0
        dm = PreferenceDataModule(toks, pre, BATCH, tok.pad_token_id, seed=0, trunk=trunk)
        mod = PreferenceModule(model, BETA, LR, start_layer=start)
        times: list[float] = []

        class Timer(L.Callback):
            def on_train_batch_start(self, *a):
                self.t = time.perf_counter()

            def on_train_batch_end(self, *a):
                times.append(time.perf_counter() - self.t)

        trainer = L.Trainer(max_steps=n_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", devices=1, use_distributed_sampler=False,
                            callbacks=[Timer()], precision="32-true")
        model.train()
        trainer.fit(mod, datamodule=dm)
    toks_pp = statistics.mean(len(t.prompt_ids) * 2 + len(t.chosen_ids) + len(t.rejected_ids) for t in toks)
    return {"step_s": times[warm:], "tokens_per_pair": toks_pp, "peak_rss_mb": peak_rss_mb(),
            "precompute_s": pre_s, "precompute_pairs": len(toks)}


def child(mode: str, n_steps: int, warm: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    res = run_trl(n_steps, warm) if mode == "trl" else run_ours(n_steps, warm, None if mode == "full" else 6)
    print("BENCH" + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps per mode")
    ap.add_argument("--modes", default="trl,full,top6")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--warm", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.steps, a.warm)
        return
    warm, timed = (1, 3) if a.quick else (2, 8)
    repo = Path(__file__).resolve().parents[1]
    res = {}
    for mode in a.modes.split(","):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(warm + timed), "--warm", str(warm)],
                             cwd=repo, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        r = json.loads(line[5:])
        r["median_step_s"] = statistics.median(r["step_s"])
        r["pairs_per_s"] = BATCH / r["median_step_s"]
        r["wall_s"] = time.perf_counter() - t
        res[mode] = r
        print(f"{mode:5s} median step {r['median_step_s']:.2f} s  {r['pairs_per_s']:.2f} pairs/s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB  tokens/pair {r['tokens_per_pair']:.0f}"
              + (f"  precompute {r['precompute_s']:.1f} s for {r['precompute_pairs']} pairs" if "precompute_s" in r else ""),
              flush=True)
    if "trl" in res:
        base = res["trl"]
        for mode in (m for m in res if m != "trl"):
            r = res[mode]
            per_pair_pre = r["precompute_s"] / r["precompute_pairs"]
            epoch_rate = 1.0 / (r["median_step_s"] / BATCH + per_pair_pre)  # precompute folded into one epoch
            print(f"{mode} vs TRL: {r['pairs_per_s'] / base['pairs_per_s']:.2f}x pairs/s "
                  f"({epoch_rate / base['pairs_per_s']:.2f}x with precompute folded in over an epoch), "
                  f"peak RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "step_s"} for m, r in res.items()}, indent=1))


if __name__ == "__main__":
    main()
