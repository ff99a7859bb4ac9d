"""Span scores: the one data structure between the encoder and the audit.

For latent f and a span (prompt, chosen response, rejected response), over that span's tokens
only (METHOD §2): ``max_f = max_t a[t, f]`` and ``freq_f = mean_t 1[a[t, f] > 0]``.
An empty span scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SPANS = ("prompt", "chosen", "rejected")
STATS = ("max", "freq")


def span_scores(acts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and firing frequency of each latent over the masked tokens.

    acts: (B, T, F) non-negative SAE activations; mask: (B, T) bool/0-1 selecting the span.
    Returns (max, freq), each (B, F); rows with an empty span are 0.
    """
    m = mask.to(acts.dtype).unsqueeze(-1)  # (B, T, 1)
    mx = (acts * m).amax(dim=1)  # acts >= 0, so masked-out zeros never win over a real max
    n = m.sum(dim=1).clamp_min(1.0)  # (B, 1)
    freq = ((acts > 0).to(acts.dtype) * m).sum(dim=1) / n
    return mx, freq


@dataclass
class ConceptScores:
    """Scores of ``n`` pairs over ``F`` concepts (latents or named concepts), for every span."""

    pair_ids: list[str]
    #: ``values[(span, stat)]`` -> float32 array (n, F), span in SPANS, stat in STATS.
    values: dict[tuple[str, str], np.ndarray]
    #: Tokens per span: ``n_tokens[span]`` -> int array (n,). Response lengths feed the length control.
    n_tokens: dict[str, np.ndarray]
    #: Concept names, length F (``"latent:123"``, ``"named:markdown_bold"``).
    concept_names: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def get(self, span: str, stat: str = "max") -> np.ndarray:
        return self.values[(span, stat)]

    def diff(self, stat: str = "max") -> np.ndarray:
        """Paired differences chosen - rejected, (n, F)."""
        return self.get("chosen", stat) - self.get("rejected", stat)

    def length_diff(self) -> np.ndarray:
        return self.n_tokens["chosen"].astype(np.float64) - self.n_tokens["rejected"].astype(np.float64)

    def swapped(self, flip: np.ndarray) -> ConceptScores:
        """Chosen and rejected exchanged where ``flip`` (n,) is True: the null dataset for calibration."""
        vals = dict(self.values)
        for stat in STATS:
            if ("chosen", stat) in vals:
                c, r = vals[("chosen", stat)], vals[("rejected", stat)]
                vals[("chosen", stat)] = np.where(flip[:, None], r, c)
                vals[("rejected", stat)] = np.where(flip[:, None], c, r)
        nt = dict(self.n_tokens)
        nt["chosen"] = np.where(flip, self.n_tokens["rejected"], self.n_tokens["chosen"])
        nt["rejected"] = np.where(flip, self.n_tokens["chosen"], self.n_tokens["rejected"])
        return ConceptScores(list(self.pair_ids), vals, nt, list(self.concept_names))
