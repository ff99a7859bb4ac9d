"""One no-grad pass before training: reference log-probs, every intervention's ΔA_u, the trunk output.

Everything is cached content-addressed under ``<cache>/precompute/<sha>.safetensors`` (key: the
model's weights, the token ids, the intervention's parameters and its concept sources), written to a
temporary name and renamed, so a killed pass never leaves a file that looks complete. Training then
needs no reference model: the policy is the same weights, loaded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prefsculpt.concepts.shards import load_scores
from prefsculpt.core.device import HOST, model_device, to_device
from prefsculpt.core.files import file_sha256
from prefsculpt.core.progress import track
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.tokenize import TokenizedPair
from prefsculpt.models.hooks import capture_residual, truncated_forward
from prefsculpt.shaping.registry import Intervention, ShapingError
from prefsculpt.train.forward import pack_pairs, packed_logps

log = logging.getLogger(__name__)


def sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the files' contents (memoised per path/size/mtime within the process)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + file_sha256(p, memo=True).encode())
    return h.hexdigest()[:24]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    d = Path(model_dir)
    return file_fingerprint([*d.glob("*.safetensors"), d / "config.json"])


def tokens_fingerprint(tokenized: Sequence[TokenizedPair]) -> str:
    h = hashlib.sha256()
    for t in tokenized:
        h.update(json.dumps([t.id, t.prompt_ids, t.chosen_ids, t.rejected_ids]).encode())
    return h.hexdigest()[:24]


class PrecomputeCache:
    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / "precompute"

    def get_or_compute(self, key: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        path = self.dir / f"{key}.safetensors"
        if path.exists():
            return load_file(str(path))
        out = {k: v.contiguous() for k, v in fn().items()}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}.safetensors"
        save_file(out, str(tmp))
        os.replace(tmp, path)
        return out


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class RefContext:
    """The frozen reference (the initial policy) and the concept sources, for ``Intervention.precompute``."""

    def __init__(self, model: Any, tokenizer: Any, pairs: Sequence[PreferencePair],
                 tokenized: Sequence[TokenizedPair], shaping: Any, named_concepts: Sequence[Any],
                 layer: int | None, max_prompt_tokens: int, batch_tokens: int = 8192):
        self.model, self.tokenizer = model, tokenizer
        self.pairs, self.tokenized = list(pairs), list(tokenized)
        self.shaping, self.named = shaping, {c.name: c for c in named_concepts}
        self.layer, self.max_prompt_tokens, self.batch_tokens = layer, max_prompt_tokens, batch_tokens
        self.unit_directions = bool(shaping.get("unit_directions", True))
        self.n = len(self.pairs)
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores = None
        self._sae = None
        self._dirs: dict[str, torch.Tensor] | None = None
        #: Capture the output of this layer during the reference pass (= start layer − 1), or None.
        self.trunk_layer: int | None = None
        self._trunk: dict[str, torch.Tensor] | None = None
        #: Which pairs these are in progress lines ("" for the training pairs, e.g. "validation").
        self.label = ""

    @property
    def _prefix(self) -> str:
        return f"precompute ({self.label})" if self.label else "precompute"

    # -- log-probs ---------------------------------------------------------------------------
    @torch.no_grad()
    def _logps(self, tokenized: Sequence[TokenizedPair], hooks: Callable | None,
               capture: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs (chosen, rejected), each (n,), from packed pairs; with ``capture``
        = ℓ, the output of layer ℓ of each packed row is kept from the same forward (the trunk for
        top-layer training, already in the training batch's layout)."""
        pad = self.tokenizer.pad_token_id or 0
        out = {s: torch.zeros(len(tokenized), dtype=torch.float64) for s in ("chosen", "rejected")}
        rows: list[torch.Tensor | None] = [None] * len(tokenized)
        lengths = [len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in tokenized]
        what = "reference log-probs" if hooks is None and tokenized is self.tokenized else "log-probs"
        dev = model_device(self.model)
        for idx in track(length_batches(lengths, self.batch_tokens), f"{self._prefix}: {what}", "pairs",
                         total=len(tokenized), size=len):
            batch = to_device(pack_pairs([tokenized[i] for i in idx], pad), dev)
            with contextlib.ExitStack() as stack:
                if hooks:
                    stack.enter_context(hooks(self.model))
                cap = stack.enter_context(capture_residual(self.model, capture)) if capture is not None else None
                lp = packed_logps(self.model, batch).float().cpu().double()  # (2b,); no float64 on mps
            out["chosen"][idx], out["rejected"][idx] = lp[: len(idx)], lp[len(idx) :]
            if cap:
                for j, i in enumerate(idx):
                    rows[i] = cap[-1][j, : lengths[i]].cpu().clone()
        if capture is not None:
            self._trunk = _flat_trunk(rows, tokenized)
        return out["chosen"], out["rejected"]

    def ref_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ref is None:
            want = self.trunk_layer if self._trunk is None else None
            self._ref = self._logps(self.tokenized, None, capture=want)
        return self._ref

    @torch.no_grad()
    def trunk(self, edits: Sequence[Intervention] = ()) -> dict[str, torch.Tensor]:
        """The trunk captured by the reference pass, or computed alone (stopping at its layer). With
        ``edits`` (training-time edits at or below the trunk's layer) it is computed under their hooks:
        the frozen layers below the trained ones then carry the edit, exactly as a full forward of
        the edited policy would (the reference pass stays unedited)."""
        if self._trunk is None or edits:
            if self.trunk_layer is None:
                raise ValueError("RefContext.trunk_layer is not set")
            pad = self.tokenizer.pad_token_id or 0
            rows: list[torch.Tensor | None] = [None] * len(self.tokenized)
            lengths = [len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in self.tokenized]
            dev = model_device(self.model)
            what = f"{self._prefix}: trunk (layer {self.trunk_layer}{', edited' if edits else ''})"
            for idx in track(length_batches(lengths, self.batch_tokens), what, "pairs", total=len(self.tokenized),
                             size=len):
                b = to_device(pack_pairs([self.tokenized[i] for i in idx], pad), dev)
                with contextlib.ExitStack() as stack:
                    for iv in edits:  # registered before truncated_forward's stop hook: it sees the edit
                        stack.enter_context(iv.train_hooks(self.model))
                    h = truncated_forward(self.model, b["input_ids"], b["attention_mask"], self.trunk_layer,
                                          position_ids=b["position_ids"])
                for j, i in enumerate(idx):
                    rows[i] = h[j, : lengths[i]].cpu().clone()
            self._trunk = _flat_trunk(rows, self.tokenized)
        return self._trunk

    def logps(self, hooks: Callable | None = None, prompt_suffix: str | None = None):
        toks = self.tokenized if prompt_suffix is None else self._with_suffix(prompt_suffix)
        return self._logps(toks, hooks)

    def _with_suffix(self, suffix: str) -> list[TokenizedPair]:
        """Same response tokens, prompt x ⊕ C_u: the instruction appended to the last user turn."""
        out = []
        for p, t in zip(self.pairs, self.tokenized, strict=True):
            msgs = p.messages()
            msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n\n{suffix}"}
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens:]
            out.append(TokenizedPair(t.id, ids, t.chosen_ids, t.rejected_ids, False, False, False))
        return out

    # -- concept sources ---------------------------------------------------------------------
    def concept_score(self, concept: str) -> tuple[np.ndarray, np.ndarray]:
        if concept == "length":  # built-in (R-DPO): response length in tokens
            return (np.array([len(t.chosen_ids) for t in self.tokenized], np.float32),
                    np.array([len(t.rejected_ids) for t in self.tokenized], np.float32))
        if self.shaping.get("scores_dir"):
            return self._stored_score(concept)
        name = concept.split(":", 1)[1] if concept.startswith("named:") else None
        nc = self.named.get(name) if name else None
        if nc is not None and nc.kind == "regex" and nc.pattern:
            rx = re.compile(str(nc.pattern))
            return (np.array([len(rx.findall(p.chosen)) for p in self.pairs], np.float32),
                    np.array([len(rx.findall(p.rejected)) for p in self.pairs], np.float32))
        raise ShapingError(
            f"{concept}: no span scores to shape with; set shaping.scores_dir to the encode stage's score "
            "folder, or name a regex concept (named_concepts) and refer to it as named:<name>"
        )

    def _stored_score(self, concept: str) -> tuple[np.ndarray, np.ndarray]:
        if self._scores is None:

            self._scores = load_scores(self.shaping.scores_dir)
        sc = self._scores
        if concept not in sc.concept_names:
            raise ShapingError(f"{concept}: not among the {len(sc.concept_names)} concepts in {self.shaping.scores_dir}")
        row = {pid: i for i, pid in enumerate(sc.pair_ids)}
        missing = [p.id for p in self.pairs if p.id not in row]
        if missing:
            raise ShapingError(
                f"{len(missing)} training pairs (e.g. {missing[:3]}) have no scores in {self.shaping.scores_dir}; "
                "encode the same pairs you train on"
            )
        j, idx = sc.concept_names.index(concept), [row[p.id] for p in self.pairs]
        stat = str(self.shaping.score_stat)
        return sc.get("chosen", stat)[idx, j], sc.get("rejected", stat)[idx, j]

    def direction(self, concept: str) -> torch.Tensor:
        v = self._direction(concept).float()
        if self.unit_directions:
            v = v / v.norm().clamp_min(1e-8)
        return v

    def _direction(self, concept: str) -> torch.Tensor:
        if self.shaping.get("directions_path"):
            if self._dirs is None:
                self._dirs = load_file(str(self.shaping.directions_path))
            if concept in self._dirs:
                return self._dirs[concept]
        if concept.startswith("latent:") and self.shaping.get("sae_path"):
            if self._sae is None:
                from sae_lens import SAE  # optional: heavy, used only here

                self._sae = SAE.load_from_disk(str(self.shaping.sae_path), device=HOST)
            return self._sae.W_dec[int(concept.split(":")[1])].detach()
        raise ShapingError(
            f"{concept}: no residual direction; for latent:<i> set shaping.sae_path, otherwise give "
            "shaping.directions_path (a safetensors file {concept: (d_model,) vector})"
        )

    def source_key(self) -> dict[str, Any]:
        """The concept sources a ΔA depends on (part of every intervention's cache key)."""
        files = [Path(p) for p in (self.shaping.get("directions_path"),) if p]
        if self.shaping.get("scores_dir"):
            files.append(Path(self.shaping.scores_dir) / "manifest.json")
        if self.shaping.get("sae_path"):
            files.extend(Path(self.shaping.sae_path).glob("*.safetensors"))
        named = {k: [str(v.kind), str(v.pattern)] for k, v in self.named.items()}
        return {"files": file_fingerprint([f for f in files if f.exists()]), "named": named,
                "stat": str(self.shaping.get("score_stat")), "unit": bool(self.shaping.get("unit_directions", True))}


def unit_scale(x: np.ndarray) -> float:
    """The standard deviation of ``x`` (n,), or 1 when it is ~0 (a constant column carries no per-pair
    signal to rescale)."""
    x = np.asarray(x, dtype=np.float64)
    sd = float(x.std()) if x.size > 1 else 0.0
    return sd if sd > 1e-8 else 1.0


@dataclass
class Precomputed:
    ref_c: np.ndarray  # (n,)
    ref_r: np.ndarray  # (n,)
    delta_a: np.ndarray  # (n, U) loss-term columns
    term_names: list[str]
    lambdas: np.ndarray  # (U,)
    weights: np.ndarray  # (n,) product of filter weights; 0 = dropped
    #: Intervention name -> its orientation s_u (``shaping.orient``; +1 under ``formula``): ΔA_u was
    #: multiplied by it (prevent adds s_u·v_u); ablate has none.
    orientation: dict[str, int] = field(default_factory=dict)
    #: Intervention name -> where s_u came from: audit | data | formula | assumed.
    orientation_from: dict[str, str] = field(default_factory=dict)
    #: Intervention name -> the SD of its raw ΔA_u over these pairs that the column was divided by.
    scales: dict[str, float] = field(default_factory=dict)


def run_precompute(ctx: RefContext, interventions: Sequence[Intervention], cache: PrecomputeCache,
                   model_fp: str, orient: str = "audit", like: Precomputed | None = None) -> Precomputed:
    """Reference log-probs, then per intervention its raw ΔA_u (cached), its orientation s_u
    (``Intervention.orient``: the audit's direction under ``shaping.orient=audit``) and what it puts
    in the loss (s_u·ΔA_u) or the pair weights.

    ``like``: the training pairs' result, for held-out pairs (validation): each intervention keeps
    the orientation it took there and ΔA_u is divided by the training pairs' SD, so a held-out loss
    is the training objective on other pairs."""
    base = {"model": model_fp, "tokens": tokens_fingerprint(ctx.tokenized)}
    ref = cache.get_or_compute(sha({**base, "what": "ref"}), lambda: dict(zip(("c", "r"), ctx.ref_logps(), strict=True)))
    if ctx._ref is None:  # read from the cache: the interventions' ΔA (steer, inoculate) need it, not a second pass
        ctx._ref = (ref["c"], ref["r"])
    cols, names, lams = [], [], []
    signs: dict[str, int] = dict(like.orientation) if like is not None else {}
    sources: dict[str, str] = dict(like.orientation_from) if like is not None else {}
    scales: dict[str, float] = {}
    weights = np.ones(ctx.n, np.float32)
    src = ctx.source_key()
    for iv in interventions:
        key = sha({**base, "what": iv.cache_key(), "src": src})
        res = iv.precompute(ctx) if not (cache.dir / f"{key}.safetensors").exists() else None
        raw = None
        if res is not None or not iv.touches_layers():  # a training-time edit caches nothing (precompute bound it)
            raw = cache.get_or_compute(key, lambda res=res: {"delta_a": torch.as_tensor(res)})["delta_a"].numpy()
        if like is None:
            iv.orient(raw, orient)
        if iv.oriented and like is None:
            signs[iv.name], sources[iv.name] = iv.sign, iv.sign_from
            if iv.sign_from in ("data", "assumed") and orient == "audit":
                log.warning("%s: no audit direction given (decisions `direction`, or shaping.concepts[].direction); "
                            "oriented by %s: s = %+d", iv.name,
                            "the training pairs' mean ΔA" if iv.sign_from == "data" else "assumption", iv.sign)
        if raw is None:
            continue
        # One scale for every method (the cache keeps the raw ΔA_u): score's z-scored span scores and
        # steer/inoculate's nats differ by orders of magnitude, so each column is divided by its SD over
        # the training pairs and λ = 1 means "one SD of the concept's score difference" whatever the method.
        scale = like.scales.get(iv.name, 1.0) if like is not None else unit_scale(raw)
        scales[iv.name] = scale
        da = (np.asarray(raw, np.float64) / scale * iv.sign).astype(np.float32)
        if iv.in_loss:
            cols.append(da)
            names.append(iv.name)
            lams.append(iv.lam)
        w = iv.weights(da)
        if w is not None:
            weights = weights * w.astype(np.float32)
    delta = np.stack(cols, 1) if cols else np.zeros((ctx.n, 0), np.float32)
    return Precomputed(ref["c"].numpy(), ref["r"].numpy(), delta, names, np.array(lams, np.float32), weights, signs,
                       sources, scales)


def _flat_trunk(rows: Sequence[torch.Tensor | None], tokenized: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
    """Packed rows [prompt, chosen, rejected] (P+C+R, d) concatenated, with their offsets."""
    offsets, start = [], 0
    for t in tokenized:
        offsets.append([start, len(t.prompt_ids), len(t.chosen_ids)])
        start += len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)
    return {"data": torch.cat([r for r in rows if r is not None]), "offsets": torch.tensor(offsets, dtype=torch.long)}


def trunk_cache(ctx: RefContext, start_layer: int, cache: PrecomputeCache, model_fp: str,
                dtype: str = "float32", edits: Sequence[Intervention] = ()) -> dict[str, torch.Tensor]:
    """Input of decoder layer ``start_layer`` (= output of ``start_layer − 1``) per pair, stored flat:
    ``data`` (Σ tokens, d) holding prompt, chosen response, rejected response of each pair (the prompt
    once), and ``offsets`` (n, 3) of (start, len(prompt), len(chosen)); the rejected response follows
    the chosen one. Set ``ctx.trunk_layer`` before ``run_precompute`` to get it from the same forward
    as the reference log-probs (not with ``edits``: training-time edits below ``start_layer``, folded
    into the trunk; ``run_precompute`` must have bound and oriented them)."""
    key = sha({"model": model_fp, "tokens": tokens_fingerprint(ctx.tokenized), "what": "trunk",
               "layer": start_layer, "dtype": dtype,
               **({"edits": [{**iv.cache_key(), "sign": iv.sign, "lam": iv.lam} for iv in edits],
                   "src": ctx.source_key()} if edits else {})})
    ctx.trunk_layer = start_layer - 1

    def compute() -> dict[str, torch.Tensor]:
        t = ctx.trunk(edits)
        return {"data": t["data"].to(getattr(torch, dtype)), "offsets": t["offsets"]}

    out = cache.get_or_compute(key, compute)
    ctx._trunk = None  # the cache holds it now; free the in-memory copy
    return out
