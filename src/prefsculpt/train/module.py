"""The LightningModule of concept-shaped DPO: wiring only (the math is in ``prefsculpt.shaping.losses``
and ``prefsculpt.train.forward``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from prefsculpt.shaping.losses import shaped_dpo_loss
from prefsculpt.shaping.registry import Intervention, ShapingError
from prefsculpt.train.forward import packed_logps


def freeze_below(model: Any, top_layers: int | None) -> int:
    """Train only the top ``top_layers`` decoder layers and the final norm; returns the first trained
    layer (0 = full fine-tune). The embeddings stay frozen (also as a tied LM head): they feed the
    cached trunk."""
    layers = model.model.layers
    if top_layers is None or top_layers >= len(layers):
        for p in model.parameters():
            p.requires_grad_(True)
        return 0
    if top_layers < 1:
        raise ValueError(f"train.train_top_layers must be >= 1 or null, got {top_layers}")
    start = len(layers) - top_layers
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [*layers[start:], model.model.norm]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        trained.append(head)
    for m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    return start


def split_edits(interventions: Sequence[Intervention], start_layer: int) -> tuple[list[Intervention], list[Intervention]]:
    """Training-time edits (ablate, prevent) as (live, folded): an edit at a layer the policy trains
    (ℓ ≥ ``start_layer``) runs as a hook in every training forward; one below it acts on frozen layers
    only, so its effect on their output is fixed and is folded into the cached trunk
    (``precompute.trunk_cache(edits=…)``), which is exactly the edited policy's forward."""
    edits = [iv for iv in interventions if iv.touches_layers()]
    live = [iv for iv in edits if min(iv.touches_layers()) >= start_layer]
    return live, [iv for iv in edits if iv not in live]


class PreferenceModule(L.LightningModule):
    def __init__(self, model: Any, beta: float, lr: float, term_names: Sequence[str] = (),
                 lambdas: torch.Tensor | None = None, hooks: Sequence[Intervention] = (), start_layer: int = 0,
                 weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        self.model = model
        self.beta, self.lr, self.weight_decay, self.warmup_steps = beta, lr, weight_decay, warmup_steps
        self.term_names = list(term_names)
        self.register_buffer("lambdas", torch.as_tensor(lambdas if lambdas is not None else [], dtype=torch.float32),
                             persistent=False)
        live, folded = split_edits(hooks, start_layer)
        if folded:  # they belong in the trunk; a hook on a layer the trunk skips would never run
            raise ShapingError(f"{', '.join(iv.name for iv in folded)}: edits below the trained layers "
                               f"(from {start_layer}) must be folded into the trunk (train.precompute.trunk_cache)")
        self.hooks = live
        self.start_layer = start_layer

    def policy_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected summed response log-probs, each (B,), from ONE forward over the packed pairs."""
        with contextlib.ExitStack() as stack:
            # ablate / prevent act on the policy while training and in the validation of that training
            # objective (early stopping compares like with like); never on the saved policy
            if self.training or self._trainer is not None and self.trainer.validating:
                for iv in self.hooks:
                    stack.enter_context(iv.train_hooks(self.model))
            lp = packed_logps(self.model, batch, trunk=batch.get("trunk"), start_layer=self.start_layer)  # (2B,)
        return lp.chunk(2)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = self.policy_logps(batch)
        ref_c, ref_r = batch["ref_c"].to(pc.dtype), batch["ref_r"].to(pc.dtype)
        delta_theta = (pc - ref_c) - (pr - ref_r)  # (B,)
        loss, parts = shaped_dpo_loss(delta_theta, self.beta, batch["delta_a"], self.lambdas, batch["weight"])
        parts["chosen_reward"] = (self.beta * (pc - ref_c)).detach()
        parts["rejected_reward"] = (self.beta * (pr - ref_r)).detach()
        return loss, parts

    def global_share(self, b: int) -> float:
        """``b × world / n``: this rank's share of the global batch of ``n`` pairs, relative to an equal
        share (1.0 on one device and whenever the local batches are equal). A rank's mean times it is
        ``world × (its sum) / n``, so the mean over ranks (DDP's gradient average, ``sync_dist``) is the
        global batch's mean, the one-device value, also when the short last global batch is split
        unevenly (``datamodule.BucketBatchSampler``)."""
        if self._trainer is None or self._trainer.world_size <= 1:
            return 1.0
        n = self._trainer.strategy.reduce(torch.tensor(float(b), device=self.device), reduce_op="sum")
        return b * self._trainer.world_size / float(n)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, parts = self.step(batch)
        b = batch["weight"].shape[0]
        m = {
            "train/loss": loss.detach(),
            "train/rewards/chosen": parts["chosen_reward"].mean(),
            "train/rewards/rejected": parts["rejected_reward"].mean(),
            "train/rewards/margins": parts["margin"].mean(),
            "train/rewards/accuracies": (parts["margin"] > 0).float().mean(),
            "train/shaped_accuracies": (parts["logits"] > 0).float().mean(),
            "train/pair_weight_mean": batch["weight"].mean(),
        }
        for u, name in enumerate(self.term_names):  # each concept's share of the shaped margin
            m[f"train/concept/{name}"] = parts["offsets"][:, u].mean()
        # Several devices: each logged value is the mean over ranks of the local mean scaled by the rank's
        # share (global_share), i.e. the global batch's value, the same as one device would log.
        many = self._trainer is not None and self._trainer.world_size > 1
        share = self.global_share(b)
        self.log_dict({k: (v * share).float() for k, v in m.items()}, on_step=True, on_epoch=False, batch_size=b,
                      sync_dist=many)
        return loss * share  # DDP averages the ranks' gradients: the global batch's mean

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The shaped loss (what training minimises; ``val/loss``, early stopping's monitor) and plain
        DPO's loss and accuracy on the same validation pairs."""
        loss, parts = self.step(batch)
        b = batch["weight"].shape[0]
        m = {"val/loss": loss.detach(),
             "val/dpo_loss": -torch.nn.functional.logsigmoid(parts["margin"]).mean(),
             "val/rewards/accuracies": (parts["margin"] > 0).float().mean(),
             "val/rewards/margins": parts["margin"].mean()}
        many = self._trainer is not None and self._trainer.world_size > 1
        self.log_dict({k: v.float() for k, v in m.items()}, on_step=False, on_epoch=True, batch_size=b, sync_dist=many)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0:
            return opt
        w = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
