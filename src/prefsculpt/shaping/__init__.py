"""Concept shaping: the shaped DPO loss and one registered class per intervention (METHOD §5)."""

# Importing the interventions registers them: every ``prefsculpt.shaping.*`` import sees all methods.
from prefsculpt.shaping import interventions as _interventions  # noqa: F401
from prefsculpt.shaping.config import ConceptSpec, ShapingConfig, TrainConfig
from prefsculpt.shaping.losses import shaped_dpo_loss
from prefsculpt.shaping.registry import INTERVENTIONS, Intervention, ShapingError, register_intervention
from prefsculpt.shaping.resolve import ResolvedShaping, resolve_shaping

__all__ = [
    "INTERVENTIONS",
    "ConceptSpec",
    "Intervention",
    "ResolvedShaping",
    "ShapingConfig",
    "ShapingError",
    "TrainConfig",
    "register_intervention",
    "resolve_shaping",
    "shaped_dpo_loss",
]
