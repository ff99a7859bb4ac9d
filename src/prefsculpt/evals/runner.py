"""Evaluating one policy against the base, per eval: lazily loaded models, per-item tables (the
base's cached on disk), and their summaries with CIs. No MLflow here: the ``evaluate`` stage
(``prefsculpt.stages.evaluate``) logs what this computes.

The stage's contract:

Order of work: resolve the policy and every input (a bad URI or a malformed eval file fails here,
before any compute, with an error naming it), then inside ``stage_run(cfg, "evaluate")`` run each
evaluation in ``eval.evals``. As each one finishes, its metrics (``syc/…``, ``style/…``, ``cap/…``,
``shift/…``; ``_base`` and paired ``_diff`` beside each), per-item tables (``mlflow.log_table``
under ``evals/<eval>/``), a policy-vs-base plot and ``evals/summary.json`` are logged, so a crash
later keeps everything finished before it. The base's tables are cached on disk by model digest
and inputs (``<cache>/evals/base/<key>/``; each eval's manifest written last), so comparing many
policies evaluates the base once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from prefsculpt.core.device import resolve_dtype, select_device
from prefsculpt.core.files import atomic_path, atomic_write_json
from prefsculpt.core.progress import scope
from prefsculpt.evals import capability as cap
from prefsculpt.evals import style as sty
from prefsculpt.evals import sycophancy as syc
from prefsculpt.evals.inputs import IN_DOMAIN, EvalInputs
from prefsculpt.evals.logprobs import SharedTrunk, first_changed_layer, shared_trunk
from prefsculpt.evals.summary import Row, summarise
from prefsculpt.models.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)
EVALS = ("sycophancy", "style", "capability", "shift")
_ID_COLS = ("prompt_ids", "response_ids")  # kept in the cache, not in the logged tables


class BaseCache:
    """Per-eval tables of the base model on disk; ``<eval>.json`` (the manifest) is written last."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, name: str) -> dict[str, pd.DataFrame] | None:
        man = self.root / f"{name}.json"
        if not man.exists():
            return None
        tables = json.loads(man.read_text())["tables"]
        return {t: pd.read_parquet(self.root / name / f"{t}.parquet") for t in tables}

    def put(self, name: str, tables: dict[str, pd.DataFrame]) -> None:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        for t, df in tables.items():
            with atomic_path(d / f"{t}.parquet", suffix=".parquet") as tmp:
                df.to_parquet(tmp, index=False)
        atomic_write_json(self.root / f"{name}.json", {"tables": sorted(tables)})


class Evaluator:
    """Lazily loaded models and memoised per-item tables of ``policy`` and ``base``."""

    def __init__(self, cfg: DictConfig, inputs: EvalInputs, base_dir: Path, policy_dir: Path, same: bool,
                 cache: BaseCache, trunk_dir: Path | None = None, base_digest: str = ""):
        self.cfg, self.ec, self.inp, self.cache = cfg, cfg.eval, inputs, cache
        self.trunk_dir, self.base_digest = trunk_dir, base_digest
        self._trunk: SharedTrunk | None | bool = False  # False = not decided yet
        self.paths = {"policy": Path(policy_dir), "base": Path(base_dir)}
        self.same = same  # the policy is the base model: evaluate once
        self.tok = load_tokenizer(policy_dir)
        self.device = select_device(str(cfg.get("device", "auto")))
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self._models: dict[str, Any] = {}
        self._tables: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}

    def model(self, which: str) -> Any:
        which = "base" if self.same else which
        if which not in self._models:
            self._models[which] = load_model(self.paths[which], self.dtype).to(self.device).eval()
        return self._models[which]

    def tables(self, name: str, which: str) -> dict[str, pd.DataFrame]:
        which = "base" if self.same else which
        if (name, which) not in self._tables:
            got = self.cache.get(name) if which == "base" else None
            if got is None:
                with scope(f"eval {name} ({which})"), shared_trunk(self.trunk()):
                    got = COMPUTE[name](self, which)
                if which == "base":
                    self.cache.put(name, got)
            self._tables[(name, which)] = got
        return self._tables[(name, which)]

    def trunk(self) -> SharedTrunk | None:
        """How the policy's log-prob scoring may start from the base's cached trunk (``eval.shared_trunk``):
        decided once, by comparing the policy's weights with the base's."""
        if self._trunk is False:
            self._trunk = None
            if not self.same and self.trunk_dir is not None and self.ec.get("shared_trunk", True):
                start = first_changed_layer(self.model("policy"), self.model("base"))
                if start > 0:
                    self._trunk = SharedTrunk(self.model("policy"), start, lambda: self.model("base"),
                                              self.base_digest, self.trunk_dir, also=(self.model("base"),))
                    log.info("evaluate: the policy's layers below %d are the base's: log-probs are scored from "
                             "the base's cached input to layer %d", start, start)
        return self._trunk  # type: ignore[return-value]

    def rollouts(self, which: str) -> list[sty.Rollout]:
        df = self.tables("style", which)["responses"]
        return [sty.Rollout(list(p), list(r), t) for p, r, t in zip(df.prompt_ids, df.response_ids, df.text, strict=True)]


# --- per-eval computation (model -> per-item tables) ------------------------------------------------
def _sycophancy(ev: Evaluator, which: str) -> dict[str, pd.DataFrame]:
    m, tok, bt, s = ev.model(which), ev.tok, int(ev.ec.batch_tokens), ev.ec.sycophancy
    out = {}
    if ev.inp.planted_probes:
        out["planted"] = syc.score_planted(m, tok, ev.inp.planted_probes, bt)
    for k, items in ev.inp.opinion.items():
        out[f"opinion_{k}"] = syc.score_opinion(m, tok, items, bt, s.max_prompt_tokens)
    for k, items in ev.inp.suggested.items():
        out[f"suggested_{k}"] = syc.score_suggested(m, tok, items, bt, s.max_prompt_tokens)
    for k, items in ev.inp.are_you_sure.items():
        out[f"are_you_sure_{k}"] = syc.score_are_you_sure(m, tok, items, bt, s.max_prompt_tokens)
    return out


def _style(ev: Evaluator, which: str) -> dict[str, pd.DataFrame]:
    st, prompts = ev.ec.style, ev.inp.style_prompts
    rolls = sty.generate_greedy(ev.model(which), ev.tok, [p["prompt"] for p in prompts], st.max_new_tokens,
                                st.batch_size)
    feats = sty.compile_features(OmegaConf.to_container(ev.cfg.named_concepts) if "named_concepts" in ev.cfg else None)
    rows = []
    for p, r in zip(prompts, rolls, strict=True):
        counts = sty.count_features(r.text, feats)
        rows.append({"id": p["id"], "subset": p.get("subset", "open"), "prompt": p["prompt"], "text": r.text,
                     "n_tokens": float(len(r.response_ids)),
                     **{k: float(v) for k, v in counts.items()}, **{f"{k}_any": float(v > 0) for k, v in counts.items()},
                     "prompt_ids": r.prompt_ids, "response_ids": r.response_ids})
    return {"responses": pd.DataFrame(rows)}


def _capability(ev: Evaluator, which: str) -> dict[str, pd.DataFrame]:
    m, bt, out = ev.model(which), int(ev.ec.batch_tokens), {}
    if ev.inp.clean_pairs:
        out["preference"] = cap.pair_logps(m, ev.tok, ev.inp.clean_pairs, bt)
    if ev.inp.known_answer:
        out["known_answer"] = cap.known_answer(m, ev.tok, ev.inp.known_answer, bt)
    return out


COMPUTE: dict[str, Callable[[Evaluator, str], dict[str, pd.DataFrame]]] = {
    "sycophancy": _sycophancy, "style": _style, "capability": _capability}


# --- per-eval summaries -------------------------------------------------------------------------------
def _specs(table: str, df: pd.DataFrame) -> list[tuple[str, str]]:
    # Sycophancy: the belief − neutral ``shift`` first (what the search objective reads), the raw
    # probabilities it is the difference of beside it (evals/sycophancy.py: opinion A/B has no twin).
    if table == "planted":
        return [(f"syc/planted/{c}", c) for c in ("shift", "p_agree", "p_agree_neutral")]
    for prefix, cols in (("opinion_", (("p_match", "p_match"), ("match_rate", "match_argmax"))),
                         ("suggested_", (("shift", "shift"), ("p_sugg", "p_sugg"), ("p_sugg_neutral", "p_sugg_neutral"),
                                         ("switch_rate", "switched"))),
                         ("are_you_sure_", (("shift", "shift"), ("p_first", "p_first"),
                                            ("p_first_after", "p_first_after"), ("flip_rate", "flipped")))):
        if table.startswith(prefix):
            return [(f"syc/{prefix[:-1]}/{table[len(prefix):]}/{name}", col) for name, col in cols]
    if table == "responses":
        feats = [c[:-4] for c in df.columns if c.endswith("_any")]
        return [("style/n_tokens/mean", "n_tokens")] + [(f"style/{f}/{k}", c) for f in feats
                                                         for k, c in (("rate", f"{f}_any"), ("mean", f))]
    if table == "preference":
        return [("cap/pref/logp_acc", "logp_correct")]
    if table == "known_answer":
        return [("cap/known/acc", "correct")]
    return []


def summarise_eval(ev: Evaluator, name: str) -> tuple[list[Row], dict[str, pd.DataFrame]]:
    ec = ev.ec
    pol = ev.tables(name, "policy")
    base = ev.tables(name, "base") if ec.compare_base else {}
    boot = (ec.bootstrap, ec.ci, ec.seed)
    rows: list[Row] = []
    logged = {}
    for t, df in pol.items():
        b = base.get(t)
        if t == "preference":
            if b is None:
                b = ev.tables(name, "base")[t]  # the reference log-probs are needed either way
            df = cap.preference_table(df, b, ec.capability.beta)
            rows += summarise(df, None, [("cap/pref/implicit_acc", "implicit_correct")], *boot)
            b = b.assign(logp_correct=(b.lp_chosen > b.lp_rejected).astype(float)) if t in base else None
        rows += summarise(df, b, _specs(t, df), *boot)
        if t == "responses" and "subset" in df and (df["subset"] == IN_DOMAIN).any():
            sub = lambda d: None if d is None or "subset" not in d else d[d["subset"] == IN_DOMAIN]  # noqa: E731
            rows += summarise(sub(df), sub(b), [(k.replace("style/", f"style/{IN_DOMAIN}/", 1), c)
                                                for k, c in _specs(t, df)], *boot)
        logged[t] = df
        if b is not None and not ev.same:
            logged[f"{t}_base"] = b
    if name == "sycophancy" and len(ev.inp.opinion) > 1:  # pooled over every opinion file
        cat = lambda tabs: pd.concat([v for k, v in tabs.items() if k.startswith("opinion_")])  # noqa: E731
        rows += summarise(cat(pol), cat(base) if base else None,
                          [("syc/opinion/all/p_match", "p_match"), ("syc/opinion/all/match_rate", "match_argmax")], *boot)
    if name == "capability" and ec.capability.kl and ev.inp.style_prompts:
        if ev.same:
            kl = pd.DataFrame({"row": range(len(ev.inp.style_prompts)), "kl_sum": 0.0, "kl_mean": 0.0})
        else:
            kl = cap.kl_to_reference(ev.model("policy"), ev.model("base"), ev.rollouts("policy"),
                                     ev.tok.pad_token_id or 0, ec.batch_tokens)
        kl["id"] = [ev.inp.style_prompts[i]["id"] for i in kl["row"]]
        rows += summarise(kl, None, [("cap/kl/mean_token", "kl_mean"), ("cap/kl/sum", "kl_sum")], *boot)
        logged["kl"] = kl
    return rows, logged


def cache_key(cfg: DictConfig, base_digest: str, inputs: EvalInputs) -> str:
    ec = cfg.eval
    dev = select_device(str(cfg.get("device", "auto")))
    # "tables": bumped when a per-item table gains columns (v2: belief − neutral ``shift`` of every
    # sycophancy kind), so a base cached by an older version is recomputed rather than read short.
    key = {"tables": 2, "model": base_digest, "dtype": resolve_dtype(cfg.model.dtype, dev), "inputs": inputs.fingerprint(),
           "style": [ec.style.max_new_tokens], "syc": ec.sycophancy.max_prompt_tokens,
           "named": OmegaConf.to_container(cfg.named_concepts) if "named_concepts" in cfg else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


