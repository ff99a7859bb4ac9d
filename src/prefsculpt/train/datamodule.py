"""Batches of pairs for concept-shaped DPO: length-bucketed, resumable mid-epoch, chosen+rejected stacked.

A batch holds B pairs packed as B rows ``[prompt, chosen, rejected]`` (``forward.pack_pairs``: one
forward for both responses, the prompt computed once), the cached reference log-probs, the ΔA
columns and the pair weights, and, when training the top layers only, the cached trunk of each row.
Everything cached is looked up by the pair's row in the precomputed arrays (``index`` in the batch),
so a rank that sees any subset of the pairs gets each pair's own reference log-probs.

Several devices (DDP/FSDP): every rank builds the same global batches of ``batch_size × world``
pairs (same seed and epoch: the batches one device with that batch size would see) and takes its
contiguous slice of each, so every rank has the same number of batches (DDP would hang otherwise).
The short last global batch (the pairs do not fill a whole number of global batches, e.g. after a
pair is dropped for its prompt filling ``train.max_length``) is split as evenly as possible, local
sizes differing by one, never cut: ``PreferenceModule.training_step`` scales each rank's mean by its
share of the global batch, so the averaged gradient and the logged values are the one-device ones of
the whole global batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prefsculpt.data.tokenize import TokenizedPair
from prefsculpt.train.forward import pack_pairs
from prefsculpt.train.precompute import Precomputed


def truncate_pair(t: TokenizedPair, max_length: int | None) -> TokenizedPair | None:
    """TRL's ``max_length`` with ``keep_start``: cut prompt+response to its first ``max_length`` tokens;
    None when the prompt alone fills it (no response token would be left to learn from)."""
    if max_length is None:
        return t
    room = max_length - len(t.prompt_ids)
    if room <= 0:
        return None
    return TokenizedPair(t.id, t.prompt_ids, t.chosen_ids[:room], t.rejected_ids[:room],
                         t.prompt_truncated, t.chosen_truncated or len(t.chosen_ids) > room,
                         t.rejected_truncated or len(t.rejected_ids) > room)


class PairDataset(Dataset):
    def __init__(self, tokenized: Sequence[TokenizedPair], pre: Precomputed, keep: np.ndarray,
                 trunk: dict[str, torch.Tensor] | None = None):
        self.idx = np.flatnonzero(keep)  # rows of the precomputed arrays that are trained on
        self.tokenized, self.pre, self.trunk = tokenized, pre, trunk

    def __len__(self) -> int:
        return len(self.idx)

    def length(self, i: int) -> int:
        t = self.tokenized[self.idx[i]]
        return len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.idx[i])
        item = {"index": j, "pair": self.tokenized[j], "ref_c": self.pre.ref_c[j], "ref_r": self.pre.ref_r[j],
                "delta_a": self.pre.delta_a[j], "weight": self.pre.weights[j]}
        if self.trunk is not None:
            s, p, c = (int(x) for x in self.trunk["offsets"][j])
            r = len(self.tokenized[j].rejected_ids)
            item["trunk"] = self.trunk["data"][s : s + p + c + r]  # (P+C+R, d), the packed row's layout
        return item


class _Epoch:
    """Receives Lightning's ``set_epoch`` (it looks for ``batch_sampler.sampler.set_epoch``)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffle, sort by length inside chunks of ``bucket_batches`` batches, shuffle the batches.

    Deterministic in (seed, epoch), so a restart can skip the batches it already trained on. With
    ``world`` > 1 it yields rank ``rank``'s slice of each global batch (module doc); a short last
    global batch is split as evenly as possible (ranks ``< len % world`` take one pair more), and left
    out only when it has fewer pairs than ``world`` (a rank would have none).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucket_batches: int = 32,
                 rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.lengths, self.batch_size, self.seed, self.bucket = list(lengths), batch_size, seed, bucket_batches
        self.rank, self.world = rank, world
        self.sampler = _Epoch()
        self.skip = 0  # batches of the current epoch already consumed (set on resume)
        self.consumed = 0
        self._resume_epoch: int | None = None

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``batch_size × world`` pairs every rank builds alike."""
        size = self.batch_size * self.world
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        chunk = size * self.bucket
        out: list[list[int]] = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s : s + chunk], key=lambda i: self.lengths[i])
            out.extend(part[k : k + size] for k in range(0, len(part), size))
        rng.shuffle(out)
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches: its contiguous share of each global batch."""
        if self.world == 1:
            return self.global_batches(epoch)
        out = []
        for b in self.global_batches(epoch):
            k, extra = divmod(len(b), self.world)  # extra > 0 only in the short last batch
            if k:  # fewer pairs than ranks: left out (every rank needs a pair in every step)
                start = self.rank * k + min(self.rank, extra)
                out.append(b[start : start + k + (self.rank < extra)])
        return out

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.world
        return n // size + (1 if n % size >= self.world else 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.epoch
        batches = self.batches(epoch)
        skip = self.skip if self._resume_epoch == epoch else 0
        self.skip, self._resume_epoch = 0, None
        self.consumed = skip
        for b in batches[skip:]:
            self.consumed += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_epoch, self.skip = int(state["epoch"]), int(state["consumed"])


class ResumableLoader(DataLoader):
    """A DataLoader Lightning saves in checkpoints (it has ``state_dict``), so a run killed mid-epoch
    resumes on the next unseen batch instead of replaying the epoch."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    out = pack_pairs([it["pair"] for it in items], pad_id)  # input_ids (B, L), mask (B, 1, L, L), targets
    out.update({
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),  # (B,) row in the precompute
        "ref_c": torch.tensor(np.array([it["ref_c"] for it in items]), dtype=torch.float64),  # (B,)
        "ref_r": torch.tensor(np.array([it["ref_r"] for it in items]), dtype=torch.float64),
        "delta_a": torch.tensor(np.stack([it["delta_a"] for it in items]), dtype=torch.float32),  # (B, U)
        "weight": torch.tensor(np.array([it["weight"] for it in items]), dtype=torch.float32),  # (B,)
    })
    if "trunk" in items[0]:
        hs = [it["trunk"] for it in items]
        trunk = hs[0].new_zeros(len(hs), out["input_ids"].shape[1], hs[0].shape[1])  # (B, L, d)
        for i, h in enumerate(hs):
            trunk[i, : h.shape[0]] = h
        out["trunk"] = trunk
    return out


class PreferenceDataModule(L.LightningDataModule):
    """Training batches, and validation batches when ``val`` = (tokenized, precomputed, trunk) of the
    held-out validation pairs is given (``run_precompute(..., like=<training result>)``)."""

    def __init__(self, tokenized: Sequence[TokenizedPair], pre: Precomputed, batch_size: int, pad_id: int,
                 seed: int = 0, bucket_batches: int = 32, trunk: dict[str, torch.Tensor] | None = None,
                 val: tuple[Sequence[TokenizedPair], Precomputed, dict[str, torch.Tensor] | None] | None = None):
        super().__init__()
        # Pairs whose weight is 0 were dropped by a filter: they are not batched at all.
        self.keep = pre.weights > 0
        self.dataset = PairDataset(tokenized, pre, self.keep, trunk)
        self.val_dataset = None
        if val is not None:
            vt, vpre, vtrunk = val
            self.val_dataset = PairDataset(vt, vpre, vpre.weights > 0, vtrunk)
        self.batch_size, self.pad_id, self.seed, self.bucket_batches = batch_size, pad_id, seed, bucket_batches
        self._loader: ResumableLoader | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning; None when the loader is built by hand
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def val_dataloader(self) -> DataLoader:
        """The validation pairs in fixed length-sorted batches (epoch 0's order every time), each rank its
        slice of each global batch as in training; Lightning weights each batch's mean by its size, over the
        ranks too, so the epoch's value is the one-device one even when the short last batch is split unevenly."""
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []  # type: ignore[return-value]  # Lightning skips validation on an empty loader
        ds = self.val_dataset
        rank, world = self._rank_world()
        sampler = BucketBatchSampler([ds.length(i) for i in range(len(ds))], self.batch_size, self.seed,
                                     self.bucket_batches, rank, world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=lambda items: collate(items, self.pad_id))

    def batches_per_epoch(self, world: int = 1) -> int:
        return len(BucketBatchSampler([0] * len(self.dataset), self.batch_size, self.seed, self.bucket_batches, 0, world))

    @property
    def n_dropped(self) -> int:
        return int((~self.keep).sum())

    def train_dataloader(self) -> ResumableLoader:
        if self._loader is None:
            lengths = [self.dataset.length(i) for i in range(len(self.dataset))]
            rank, world = self._rank_world()
            sampler = BucketBatchSampler(lengths, self.batch_size, self.seed, self.bucket_batches, rank, world)
            self._loader = ResumableLoader(self.dataset, batch_sampler=sampler, num_workers=0,
                                           collate_fn=lambda items: collate(items, self.pad_id))
        return self._loader
