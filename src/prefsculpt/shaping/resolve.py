"""From config (``shaping.concepts``) and/or a ``decisions.yaml`` to the list of interventions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefsculpt.audit.decisions import Action
from prefsculpt.shaping.config import ConceptSpec
from prefsculpt.shaping.decisions import load_decisions, param_fields
from prefsculpt.shaping.registry import (
    Intervention,
    ShapingError,
    Spec,
    build_interventions,
    get_intervention,
)

_SPEC_FIELDS = {f.name for f in fields(ConceptSpec)}
#: Parameter names of any method: such a key on an entry is a parameter (checked by its method).
_PARAM_KEYS = set(param_fields())


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
        return [{"name": iv.name, "lambda": iv.lam, "layer": iv.layer, "direction": iv.direction, **iv.params,
                 **({"members": iv.members} if iv.members else {})} for iv in self.interventions]


def _params(method: str, entry: Mapping[str, Any], shaping: DictConfig) -> dict[str, Any]:
    """The method's parameters: the entry's own (non-null) values, else the ``shaping`` defaults; a
    value the method does not take is kept, so that validation names it."""
    cls = get_intervention(method, str(entry.get("concept")))
    out = cls.resolve_params(entry, shaping, str(entry.get("concept")))
    out.update({k: v for k, v in entry.items() if k not in out and k in _PARAM_KEYS and v is not None})
    return out


def resolve_shaping(shaping: DictConfig, layer: int | None, known_concepts: list[str] | None = None) -> ResolvedShaping:
    """Decisions-file entries first, then ``shaping.concepts``; ``allow`` entries are skipped."""
    specs: list[Spec] = []
    dhash = dpath = None
    if shaping.get("decisions"):
        dpath = str(shaping.decisions)
        dec = load_decisions(dpath, known_concepts)
        dhash = dec.hash
        for d in dec.active():
            entry = {"concept": d.concept, **d.params}
            specs.append(Spec(d.concept, d.method, d.action, d.strength, _params(d.method, entry, shaping),
                              d.direction, d.members))
    for i, c in enumerate(shaping.get("concepts") or []):
        c = OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else dict(c)
        spec = ConceptSpec(**{k: v for k, v in c.items() if k in _SPEC_FIELDS})  # the dataclass defaults
        if not spec.concept:
            raise ShapingError(f"shaping.concepts[{i}] has no concept; give e.g. concept: latent:12")
        if spec.action == Action.allow:
            continue
        if spec.direction is not None and spec.direction not in (1, -1):
            raise ShapingError(f"shaping.concepts[{i}] ({spec.concept}): direction must be 1 (the preferred side has "
                               f"more of it) or -1 (less), got {spec.direction!r}")
        specs.append(Spec(spec.concept, spec.method, spec.action, float(spec.strength),
                          _params(spec.method, c, shaping), spec.direction, tuple(spec.members or ())))
    lay = shaping.get("layer")
    lay = layer if lay is None else int(lay)
    return ResolvedShaping(build_interventions(specs, lay), dhash, dpath)
