"""Benchmark the concept encoder against a naive baseline and the roofline.

- encoder: ``encode_pairs`` (Lightning predict, packed pairs, truncated forward at layer ℓ, SAE,
  span scores, shards, top contexts) on planted pairs, fresh output folder each repeat.
- naive: one sequence at a time (prompt+chosen, then prompt+rejected), full forward with
  ``output_hidden_states``, take ``hidden_states[ℓ+1]``, SAE encode, max / freq per span.
- roofline: FLOPs per token of the truncated forward (linear layers of layers 0..ℓ, attention
  scores at the mean causal context) plus the SAE encoder, at the matmul rate measured here.
- memory: peak RSS of a fresh process that encodes 1,000 and then 4,000 pairs.

Throughput counts *pair tokens* (prompt + chosen + rejected, each once: the tokens that get
scores), for both the encoder and the naive baseline.

    python bench/encode.py            # full: SmolLM2-135M fp32, layer 15 (~20+ min on 2 cores)
    python bench/encode.py --quick    # small run, a few minutes
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

import torch  # noqa: E402


def setup(n_pairs: int, layer: int, expansion: int, k: int, seed: int = 0):
    import logging

    from sae_lens import TopKSAE, TopKSAEConfig

    from prefsculpt.data.planted import PlantedConfig, generate_planted
    from prefsculpt.data.tokenize import tokenize_pairs
    from prefsculpt.models.loading import load_model, load_tokenizer, resolve_model_dir

    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    mdir = resolve_model_dir("smollm2-135m-instruct")
    model, tok = load_model(mdir).eval(), load_tokenizer(mdir)
    pairs = generate_planted(PlantedConfig(n_pairs=n_pairs, seed=seed))
    tokenized = tokenize_pairs(pairs, tok)
    d = model.config.hidden_size
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=expansion * d, k=k)).eval()  # random weights: speed only
    return model, tok, tokenized, sae


def pair_tokens(tokenized) -> int:
    return sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in tokenized)


def time_encoder(model, tok, tokenized, sae, layer, batch_tokens, precision, threads=None) -> float:
    from prefsculpt.concepts.config import EncodeConfig
    from prefsculpt.concepts.encoder import encode_pairs

    cfg = EncodeConfig(batch_tokens=batch_tokens, precision=precision)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        encode_pairs(model, sae, tokenized, Path(d) / "scores", cfg, layer, tokenizer=tok, num_threads=threads)
        return time.perf_counter() - t0


def time_naive(model, tokenized, sae, layer) -> float:
    from prefsculpt.concepts.scores import span_scores

    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in tokenized:
            n_p = len(t.prompt_ids)
            for side in ("chosen", "rejected"):
                ids, _ = t.sequence(side)
                h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1]  # (1, T, d)
                a = sae.encode(h)
                resp = torch.zeros(1, len(ids), dtype=torch.bool)
                resp[0, n_p:] = True
                span_scores(a, resp)
                if side == "chosen":
                    span_scores(a, ~resp)
    return time.perf_counter() - t0


def matmul_gflops(reps: int = 5, threads: int | None = None) -> float:
    """Best of two shapes: an MLP-shaped (4096x576 @ 576x1536) and a square 1024^3 fp32 matmul."""
    best = 0.0
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    for m, kk, n in ((4096, 576, 1536), (1024, 1024, 1024)):
        a, b = torch.randn(m, kk), torch.randn(kk, n)
        a @ b  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * kk * n / statistics.median(times) / 1e9)
    torch.set_num_threads(prev)
    return best


def flops_per_token(cfg, layer: int, d_sae: int, mean_ctx: float) -> float:
    """Forward FLOPs per token of decoder layers 0..ℓ plus the SAE encoder (no norm / lm_head)."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    head = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    linear = d * q + 2 * d * kv + q * d + 3 * d * inter  # weights touched per token per layer
    attention = 2 * q * mean_ctx  # QK^T and AV: 2 * (2 * ctx * q) / 2 flops-per-MAC folded below
    per_layer = 2 * linear + 2 * attention
    return (layer + 1) * per_layer + 2 * d * d_sae


def mean_causal_context(tokenized) -> float:
    """Mean number of keys a token attends to in the packed layout (prompt once, both responses)."""
    tot, n = 0.0, 0
    for t in tokenized:
        p, c, r = len(t.prompt_ids), len(t.chosen_ids), len(t.rejected_ids)
        tot += p * (p + 1) / 2 + sum(p + j + 1 for j in range(c)) + sum(p + j + 1 for j in range(r))
        n += p + c + r
    return tot / n


def memory_child(n_pairs: int, layer: int, expansion: int, k: int, batch_tokens: int, precision: str) -> None:
    model, tok, tokenized, sae = setup(n_pairs, layer, expansion, k)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    secs = time_encoder(model, tok, tokenized, sae, layer, batch_tokens, precision)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"n_pairs": n_pairs, "peak_rss_mb": peak / 1024, "setup_rss_mb": rss_setup / 1024, "seconds": secs}
    sys.stdout.write(json.dumps(out) + "\n")


def run_memory(args) -> list[dict]:
    results = []
    for n in args.mem_pairs:
        layer = args.layer if args.mem_layer is None else args.mem_layer
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--layer", str(layer),
               "--expansion", str(args.expansion), "--k", str(args.k), "--batch-tokens", str(args.batch_tokens),
               "--precision", args.precision, "--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {n} pairs failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        sys.stdout.write(f"  memory: {n} pairs, layer {layer} -> peak RSS {results[-1]['peak_rss_mb']:.0f} MB "
                         f"({results[-1]['seconds']:.0f} s)\n")
        sys.stdout.flush()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run: fewer pairs and repeats, 100 vs 400 pairs for memory")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--expansion", type=int, default=8, help="SAE width = expansion * d_model (default config)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=256, help="pairs for the encoder throughput")
    ap.add_argument("--naive-pairs", type=int, default=24, help="pairs for the naive baseline")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for encoder and naive (default: torch's)")
    ap.add_argument("--mem-pairs", type=int, nargs="*", default=[1000, 4000])
    ap.add_argument("--mem-layer", type=int, default=None,
                    help="layer for the memory runs (default --layer); a lower one only saves time on a busy machine")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.layer, args.expansion, args.k, args.batch_tokens, args.precision)
        return
    if args.quick:
        args.pairs, args.naive_pairs, args.repeats = 64, 12, 2
        args.mem_pairs = [100, 400] if args.mem_pairs == [1000, 4000] else args.mem_pairs

    if args.memory_only:
        report_memory(args)
        return
    model, tok, tokenized, sae = setup(max(args.pairs, args.naive_pairs), args.layer, args.expansion, args.k)
    enc_pairs, naive_pairs = tokenized[: args.pairs], tokenized[: args.naive_pairs]
    threads = torch.get_num_threads()
    out = sys.stdout.write
    out(f"SmolLM2-135M {args.precision}, layer {args.layer}, SAE {sae.cfg.d_sae} latents, torch threads {threads} "
        f"(of {os.cpu_count()} cpus); {args.pairs} pairs ({pair_tokens(enc_pairs)} pair tokens) for the encoder, "
        f"{args.naive_pairs} for the naive baseline; medians of {args.repeats}\n")
    time_encoder(model, tok, tokenized[:8], sae, args.layer, args.batch_tokens, args.precision)  # warm-up
    enc, naive, rate, rate_here = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load on the shared machine hits all alike
        # the roofline uses the machine's best matmul rate over thread counts, not only ours
        rates = {n: matmul_gflops(threads=n) for n in range(1, (os.cpu_count() or 1) + 1)}
        rate.append(max(rates.values()))
        rate_here.append(rates.get(threads, matmul_gflops()))
        enc.append(pair_tokens(enc_pairs) / time_encoder(model, tok, enc_pairs, sae, args.layer, args.batch_tokens, args.precision))
        naive.append(pair_tokens(naive_pairs) / time_naive(model, naive_pairs, sae, args.layer))
        out(f"  repeat: encoder {enc[-1]:.0f} tok/s, naive {naive[-1]:.0f} tok/s, matmul GFLOP/s by threads "
            + ", ".join(f"{n}: {r:.0f}" for n, r in rates.items()) + "\n")
        sys.stdout.flush()
    enc_m, naive_m, rate_m = statistics.median(enc), statistics.median(naive), statistics.median(rate)
    fpt = flops_per_token(model.config, args.layer, int(sae.cfg.d_sae), mean_causal_context(enc_pairs))
    roof = rate_m * 1e9 / fpt
    # On a shared machine the load moves between repeats: the ratios within a repeat (measured
    # back to back) are steadier than ratios of medians, so both are printed.
    vs_naive = statistics.median(e / n for e, n in zip(enc, naive, strict=True))
    vs_roof = statistics.median(e / (r * 1e9 / fpt) for e, r in zip(enc, rate, strict=True))
    out(f"encoder   {enc_m:8.0f} pair tok/s\n")
    out(f"naive     {naive_m:8.0f} pair tok/s   -> encoder / naive    = {enc_m / naive_m:.2f}x of medians, "
        f"{vs_naive:.2f}x median of per-repeat ratios (target >= 3x)\n")
    out(f"roofline  {roof:8.0f} pair tok/s   ({fpt / 1e6:.1f} MFLOP/token at {rate_m:.0f} GFLOP/s, the best measured "
        f"matmul rate; {statistics.median(rate_here):.0f} at {threads} threads) -> encoder / roofline = {enc_m / roof:.0%} "
        f"of medians, {vs_roof:.0%} median of per-repeat ratios (target >= 50%)\n")
    if not args.skip_memory:
        report_memory(args)


def report_memory(args) -> None:
    mem = run_memory(args)
    ratio = mem[-1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
    sys.stdout.write(f"peak RSS  {mem[0]['n_pairs']} pairs {mem[0]['peak_rss_mb']:.0f} MB, {mem[-1]['n_pairs']} pairs "
                     f"{mem[-1]['peak_rss_mb']:.0f} MB -> ratio {ratio:.3f} (target <= 1.15)\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
