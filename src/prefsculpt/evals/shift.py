"""Concept shift against its prediction (METHOD §6): did training move the concepts the audit said?

Greedy rollouts of the base and of the policy on the same held-out prompts are SAE-encoded at layer
ℓ; each concept's score per rollout is its max activation over the response tokens (the audit's
span statistic; a cluster scores the mean of its members). The measured shift of a concept is
``mean(policy) − mean(base)``, and ``shift_z`` divides it by the pooled sd of the scores, so it
reads on the scale of the audit's paired effect ``d_z``.

What is compared, and how (per trained policy: one evaluate run):

- **hypotheses only**: the audit's top-N hypotheses (plus any concept the policy's training shaped
  beyond the top N). Agreement of predicted effect and measured ``shift_z`` is Spearman's ρ and R²
  (squared Pearson, a linear fit with intercept) with its n, over the hypotheses (``hyp_*``) and
  separately over those the policy's training **shaped** (``shaped_*``) and those it left alone
  (``unshaped_*``): the audit predicts what *plain* DPO teaches, so an unshaped hypothesis should
  follow the prediction and a suppressed one should move less along it (``*_along_z``: mean of
  ``shift_z × sign(predicted)``, the shift in the direction the data teaches). Which concepts were
  shaped comes from the policy's train run (``tracking/shift_sources.py``); unknown (a bare folder)
  reports the hypotheses only.
- **random controls**, N latents that are no hypothesis, are never mixed into a correlation: they
  are the reference for how much an arbitrary latent moves (``control_abs_shift_z`` against the
  hypotheses' ``hyp_abs_shift_z``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE
from scipy import stats as sps

from prefsculpt.concepts.activations import length_buckets
from prefsculpt.concepts.scores import span_scores
from prefsculpt.core.device import HOST, model_device
from prefsculpt.evals.style import Rollout
from prefsculpt.models.hooks import truncated_forward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptSet:
    """The concepts compared: names, member latents of each, predicted effect, control flag, and
    whether the policy's training shaped each (``shaped`` None: not known)."""

    names: list[str]
    members: list[list[int]]
    predicted: np.ndarray  # (C,)
    control: np.ndarray  # (C,) bool
    shaped: np.ndarray | None = None  # (C,) bool; never True on a control

    @property
    def latents(self) -> list[int]:
        return sorted({j for m in self.members for j in m})


def _latent_index(name: str) -> int | None:
    kind, _, idx = str(name).partition(":")
    return int(idx) if kind == "latent" and idx.isdigit() else None


def select_concepts(hyp: pd.DataFrame, d_sae: int, top_n: int, n_random: int, seed: int = 0,
                    predicted: str = "d_z", shaped: Collection[str] | None = None) -> ConceptSet:
    """Top-N hypotheses (by ``rank``, latents and clusters with member lists) + N random other latents.

    ``shaped``: the concepts the policy's training shaped (None = not known). A shaped concept ranked
    below the top N is compared too (it is what the training changed); one the table lacks, or a
    named concept, is left out with a log line. A control latent is never a shaped one; it takes its
    predicted effect from the table when the audit tested it, else 0 (untested: too rare to have an
    effect on the data). Named/built-in concepts have no latent and are skipped (their text-level
    effect is the style eval's business).
    """
    if predicted not in hyp.columns or "concept" not in hyp.columns:
        raise ValueError(f"the hypotheses table needs columns 'concept' and {predicted!r} (has {list(hyp.columns)})")
    want = {str(c) for c in shaped or ()}
    t = hyp[hyp["rank"].notna()].sort_values("rank") if "rank" in hyp.columns else hyp
    names, members, pred = [], [], []
    for _, r in t.iterrows():
        if len(names) >= top_n:
            if not want - set(names):
                break
            if str(r["concept"]) not in want:
                continue
        j = _latent_index(r["concept"])
        mem = [j] if j is not None else [_latent_index(m) for m in (r.get("members") if isinstance(r.get("members"), list | np.ndarray) else [])]
        mem = [m for m in mem if m is not None and 0 <= m < d_sae]
        if not mem or not np.isfinite(r[predicted]):
            continue
        names.append(str(r["concept"]))
        members.append(mem)
        pred.append(float(r[predicted]))
    missing = sorted(want - set(names))
    if missing:
        log.info("concept shift: shaped concept(s) %s are not latent/cluster hypotheses with a finite %s; not "
                 "compared", missing, predicted)
    used = {j for m in members for j in m}
    for c in want:  # a shaped latent that is no hypothesis must not serve as a control either
        if (j := _latent_index(c)) is not None:
            used.add(j)
    table_pred = {j: float(v) for c, v in zip(hyp["concept"], hyp[predicted], strict=True)
                  if (j := _latent_index(c)) is not None and np.isfinite(v)}
    pool = np.array([j for j in range(d_sae) if j not in used])
    rng = np.random.default_rng(seed)
    ctrl = sorted(rng.choice(pool, size=min(n_random, len(pool)), replace=False).tolist()) if len(pool) else []
    n_h = len(names)
    names += [f"latent:{j}" for j in ctrl]
    members += [[j] for j in ctrl]
    pred += [table_pred.get(j, 0.0) for j in ctrl]
    control = np.arange(len(names)) >= n_h
    is_shaped = None if shaped is None else np.array([n in want and not c for n, c in zip(names, control, strict=True)],
                                                       dtype=bool)
    return ConceptSet(names, members, np.array(pred, dtype=np.float64), control, is_shaped)


def rollout_latent_scores(model: Any, sae: Any, layer: int, rollouts: Sequence[Rollout], latents: Sequence[int],
                          pad_id: int, batch_tokens: int = 4096) -> np.ndarray:
    """(n_rollouts, L) max activation of each latent over each rollout's response tokens (0 if none)."""
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    out = np.zeros((len(rollouts), len(lat)), dtype=np.float64)
    for idx in length_buckets([len(s) for s in seqs], range(len(seqs)), batch_tokens):
        t = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), t), dtype=torch.long)
        resp = torch.zeros((len(idx), t), dtype=torch.bool)
        for b, i in enumerate(idx):
            n_p, n = len(rollouts[i].prompt_ids), len(seqs[i])
            ids[b, :n], att[b, :n], resp[b, n_p:n] = torch.tensor(seqs[i]), 1, True
        dev = model_device(model)
        with torch.no_grad():
            h = truncated_forward(model, ids.to(dev), att.to(dev), layer)  # (B, T, d)
            acts = sae.encode(h.to(sae.W_enc.device, sae.W_enc.dtype))[..., lat.to(sae.W_enc.device)]  # (B, T, L)
            mx, _ = span_scores(acts.clamp_min(0), resp.to(acts.device))  # (B, L)
        out[idx] = mx.double().cpu().numpy()
    return out


def concept_scores(latent_scores: np.ndarray, latents: Sequence[int], cs: ConceptSet) -> np.ndarray:
    """(n, C): each concept's score, the mean of its member latents' scores."""
    col = {j: k for k, j in enumerate(latents)}
    return np.stack([latent_scores[:, [col[j] for j in m]].mean(axis=1) for m in cs.members], axis=1)


def measured_shift(base: np.ndarray, policy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per concept (C,): raw shift mean(policy) − mean(base), and shift_z = shift / pooled sd.

    base: (n_b, C), policy: (n_p, C). A concept that never varies gets shift_z 0.
    """
    shift = policy.mean(axis=0) - base.mean(axis=0)
    sd = np.concatenate([base, policy]).std(axis=0, ddof=1) if len(base) + len(policy) > 1 else np.zeros(base.shape[1])
    return shift, np.where(sd > 0, shift / np.where(sd > 0, sd, 1.0), 0.0)


def agreement(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Spearman ρ and R² (squared Pearson) of measured on predicted; NaN when undefined."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return {"spearman": float("nan"), "r2": float("nan"), "n": float(len(p))}
    rho = float(sps.spearmanr(p, m).statistic)
    r = float(np.corrcoef(p, m)[0, 1])
    return {"spearman": rho, "r2": r * r, "n": float(len(p))}


def _group_metrics(prefix: str, pred: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """Agreement (ρ, R², n), mean |shift_z|, sign agreement and mean shift along the prediction."""
    m = {f"{prefix}_{k}": v for k, v in agreement(pred, z).items()}
    if len(z):
        m[f"{prefix}_abs_shift_z"] = float(np.abs(z).mean())
        m[f"{prefix}_sign_agree"] = float((np.sign(z) == np.sign(pred)).mean())
        m[f"{prefix}_along_z"] = float((z * np.sign(pred)).mean())
    return m


def shift_table(cs: ConceptSet, base: np.ndarray, policy: np.ndarray) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per concept table and the summary metrics: the hypotheses only (``hyp_*``), split into shaped
    and unshaped when known (``shaped_*``, ``unshaped_*``, each with its own n), and the random
    controls apart as the reference (``control_abs_shift_z``). No correlation mixes in a control."""
    shift, z = measured_shift(base, policy)
    h = ~cs.control
    group = np.where(cs.control, "control", "hypothesis").astype(object)
    if cs.shaped is not None:
        group[h] = np.where(cs.shaped[h], "shaped", "unshaped")
    t = pd.DataFrame({"concept": cs.names, "control": cs.control, "group": group, "predicted": cs.predicted,
                      "base_mean": base.mean(axis=0), "policy_mean": policy.mean(axis=0), "shift": shift, "shift_z": z})
    m = _group_metrics("hyp", cs.predicted[h], z[h])
    if cs.shaped is not None:
        for name, sel in (("shaped", h & cs.shaped), ("unshaped", h & ~cs.shaped)):
            m.update(_group_metrics(name, cs.predicted[sel], z[sel]))
    m["control_abs_shift_z"] = float(np.abs(z[~h]).mean()) if (~h).any() else float("nan")
    m["control_n"] = float((~h).sum())
    return t, m


@dataclass(frozen=True)
class ShiftSources:
    """The SAE and the audit's predictions the concept-shift eval compares against, and the concepts
    the policy's training shaped (None: not known, e.g. a bare model folder)."""

    sae_path: Path
    hypotheses: pd.DataFrame
    layer: int
    origin: str
    shaped: list[str] | None = None
    #: concept -> signed λ of its intervention (sign: suppress/amplify, see METHOD §5)
    shaped_lambda: Mapping[str, float] = field(default_factory=dict)


def compute_shift(ev: Any, src: ShiftSources) -> tuple[pd.DataFrame, dict[str, float]]:
    """Encode base and policy rollouts; the measured shift per concept against the audit's prediction."""
    sc = ev.ec.shift
    sae = SAE.load_from_disk(str(src.sae_path), device=str(getattr(ev, "device", HOST))).eval()
    cs = select_concepts(src.hypotheses, int(sae.cfg.d_sae), sc.top_n, sc.n_random, int(ev.ec.seed),
                         sc.predicted, src.shaped)
    pad, bt = ev.tok.pad_token_id or 0, int(ev.ec.batch_tokens)
    scores = {}
    for which in ("base", "policy"):
        lat = rollout_latent_scores(ev.model(which), sae, src.layer, ev.rollouts(which), cs.latents, pad, bt)
        scores[which] = concept_scores(lat, cs.latents, cs)
    table, m = shift_table(cs, scores["base"], scores["policy"])
    table["lambda"] = [float(src.shaped_lambda.get(c, np.nan)) if g == "shaped" else np.nan
                       for c, g in zip(table["concept"], table["group"], strict=True)]
    return table, {f"shift/{k}": v for k, v in m.items() if pd.notna(v)}
