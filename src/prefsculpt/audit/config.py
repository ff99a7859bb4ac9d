"""Config schema of the audit stage (field docs live here, once)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: Span statistic (METHOD §2): the max activation over the span, or the share of tokens firing.
ScoreStat = StrEnum("ScoreStat", ["max", "freq"])


PairedTest = StrEnum("PairedTest", ["wilcoxon", "sign"])


RankBy = StrEnum("RankBy", ["conservative", "split_half"])


@dataclass
class AuditConfig:
    #: Span statistic tested: max | freq.
    score: ScoreStat = ScoreStat.max
    #: wilcoxon | sign
    test: PairedTest = PairedTest.wilcoxon
    #: FDR level for Benjamini–Hochberg.
    fdr: float = 0.05
    #: Latents firing on fewer than this share of pairs (either side) are not tested.
    min_support: float = 0.01
    #: Concepts where fewer pairs differ between chosen and rejected are not tested (not in BH's m).
    min_nonzero_pairs: int = 10
    #: Null calibration: re-run every BH family (latents, latent clusters, near-duplicate groups, named,
    #: built-ins, and the data-cluster "where it holds" tests) this many times with chosen/rejected
    #: swapped at random, and count the seeds with any discovery (q < fdr). 0 = off.
    calibration_seeds: int = 20
    #: Calibration fails when the number of null seeds with a discovery would be this unlikely
    #: (binomial tail below it) were the tests holding their level fdr per seed: at 20 seeds and
    #: fdr 0.05, more than 2 seeds fail it (1 at 3 seeds is tolerated, 2 are not). The report then
    #: says so at its top and no decisions are proposed.
    calibration_alpha: float = 0.1
    #: Ranking of significant hypotheses: conservative (the smaller of the split-half effect and the
    #: length-controlled effect) | split_half (the smaller half effect only, as in METHOD §3).
    rank_by: RankBy = RankBy.conservative
    #: Hypotheses kept in the report / proposed decisions.
    top_k: int = 50
    #: Data clusters (spherical k-means on symmetric activity) for "where it holds".
    n_data_clusters: int = 8
    min_cluster_size: int = 30
    #: Latent clusters by co-firing (NMI graph + Leiden), tested like latents.
    latent_clusters: bool = True
    nmi_top_fraction: float = 0.01
    min_latent_cluster: int = 4
    #: Near-duplicate latents (correlation of their firing over responses >= duplicate_min_corr, and
    #: top contexts alike: at least duplicate_min_overlap of the same token positions or of the same
    #: tokens) are tested and shown as one cluster row (cluster_type near_duplicate) listing its members.
    merge_duplicates: bool = True
    duplicate_min_corr: float = 0.5
    duplicate_min_overlap: float = 0.5
    #: Concepts listed under the length hypothesis as what carries the length difference.
    length_carriers: int = 10
    #: Example pairs per hypothesis in the report.
    n_examples: int = 3
    #: Labels: most frequent top-activation tokens shown, and contexts per response side.
    label_tokens: int = 3
    label_contexts: int = 3
    #: Data clusters listed per hypothesis under "where it concentrates".
    where_top: int = 3
    #: Planted data only: a hypothesis "captures" a planted concept when the correlation of its d
    #: with the planted tag difference (chosen - rejected) is at least this.
    planted_min_corr: float = 0.5
    #: Optional OpenAI-compatible endpoint for label explanations (key from env var named below).
    explain_base_url: str | None = None
    explain_model: str | None = None
    explain_api_key_env: str = "OPENAI_API_KEY"
    #: Seconds to wait for one explanation; the top this-many hypotheses are explained.
    explain_timeout_s: float = 30.0
    #: Retries of a failing request (5xx, 429, timeout) after 1, 2, 4... × ``explain_backoff_s`` seconds;
    #: an endpoint that still fails leaves the offline labels (a warning, tag prefsculpt.explain_error).
    explain_retries: int = 3
    explain_backoff_s: float = 1.0
    explain_top: int = 20
    #: Run id of the sae run to read concept scores from (null = the latest finished sae run under
    #: the same parent run, else in the same experiment).
    scores_run_id: str | None = None
