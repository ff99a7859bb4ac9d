"""From config (``shaping.concepts``) and/or a ``decisions.yaml`` to the list of interventions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefsculpt.shaping.registry import Intervention, Spec, build_interventions


@dataclass
class ResolvedShaping:
    interventions: list[Intervention]
    #: sha256 of the decisions file content (None when no file was used).
    decisions_hash: str | None
    decisions_path: str | None

    @property
    def loss_terms(self) -> list[Intervention]:
        return [iv for iv in self.interventions if iv.in_loss]

    def summary(self) -> list[dict[str, Any]]:
        return [{"name": iv.name, "lambda": iv.lam, "layer": iv.layer, **iv.params} for iv in self.interventions]


def _params(method: str, entry: Any, shaping: DictConfig) -> dict[str, Any]:
    """Method parameters from the entry's own fields, else the ``shaping`` defaults."""
    get = (lambda k: entry.get(k)) if isinstance(entry, dict) else (lambda k: getattr(entry, k, None))
    concept = get("concept")
    if method == "steer":
        m = get("multiplier")
        return {"multiplier": float(shaping.steer_multiplier if m is None else m)}
    if method == "inoculate":
        instr = get("instruction") or dict(shaping.instructions or {}).get(concept)
        return {"instruction": instr}
    if method == "filter":
        share = get("share")
        return {"mode": str(shaping.filter_mode), "share": float(shaping.filter_share if share is None else share)}
    return {}


def resolve_shaping(shaping: DictConfig, layer: int | None, known_concepts: list[str] | None = None) -> ResolvedShaping:
    """Decisions-file entries first, then ``shaping.concepts``; ``allow`` entries are skipped."""
    specs: list[Spec] = []
    dhash = dpath = None
    if shaping.get("decisions"):
        from prefsculpt.audit.decisions import load_decisions

        dpath = str(shaping.decisions)
        dec = load_decisions(dpath, known_concepts)
        dhash = dec.hash
        for d in dec.active():
            entry = {"concept": d.concept, **dict(getattr(d, "params", {}) or {})}
            specs.append(Spec(d.concept, d.method, d.action, d.strength, _params(d.method, entry, shaping)))
    for c in shaping.get("concepts") or []:
        c = OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else dict(c)
        if c.get("action", "suppress") == "allow":
            continue
        method = c.get("method", "score")
        specs.append(Spec(str(c["concept"]), method, c.get("action", "suppress"), float(c.get("strength", 1.0)),
                          _params(method, c, shaping)))
    lay = shaping.get("layer")
    lay = layer if lay is None else int(lay)
    return ResolvedShaping(build_interventions(specs, lay), dhash, dpath)
