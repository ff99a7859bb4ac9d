"""Benchmark: the style eval's greedy generation, one generate() call against several (SmolLM2-135M).

Baseline: the same prompts in ``generate()`` calls of 20 prompts (``eval.style.batch_size`` before
2026-12-03), measured in the same run. Reported: median wall seconds of ``--reps`` repetitions per
(prompt count, batch size), and the ratio baseline / one call.

Prompt counts are the default run's: 21 (a trial's first budget: 34% of the 40 neutral + 20 in-domain
prompts), 43 (a full trial on ``select``) and 60 (all of them). Prompts: the built-in neutral style
prompts (``make_probes("style", ...)``), cycled when more are asked for than exist.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/generate.py [--counts 21,43,60] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prefsculpt.data.planted import make_probes
from prefsculpt.evals.style import generate_greedy
from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir

BASELINE_BATCH = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--counts", default="21,43,60")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()
    d = resolve_model_dir(a.model)
    tok, model = load_tokenizer(d), load_model(d)
    model.eval()
    pool = [p["prompt"] for p in make_probes("style", 10**6, 0)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(pool)} distinct prompts")
    for n in (int(x) for x in a.counts.split(",")):
        prompts = [pool[i % len(pool)] for i in range(n)]
        med = {}
        for bs in (BASELINE_BATCH, n):
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                generate_greedy(model, tok, prompts, a.max_new_tokens, bs)
                ts.append(time.perf_counter() - t)
            med[bs] = statistics.median(ts)
            calls = -(-n // bs)
            print(f"{n} prompts, batch_size {bs} ({calls} call{'s' if calls > 1 else ''}): median {med[bs]:.1f} s "
                  f"of {[round(x, 1) for x in ts]}", flush=True)
        print(f"{n} prompts: one call is {med[BASELINE_BATCH] / med[n]:.2f}x faster than batches of {BASELINE_BATCH}")


if __name__ == "__main__":
    main()
