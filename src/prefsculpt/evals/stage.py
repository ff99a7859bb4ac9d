"""The ``evaluate`` entry point: one policy against the base, every result tracked in MLflow.

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

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from prefsculpt.evals import capability as cap
from prefsculpt.evals import style as sty
from prefsculpt.evals import sycophancy as syc
from prefsculpt.evals.inputs import IN_DOMAIN, EvalInputs, load_inputs
from prefsculpt.evals.policy import ResolvedPolicy, model_digest, resolve_policy
from prefsculpt.evals.shift_sources import ShiftSources, resolve_shift_sources, run_shift
from prefsculpt.evals.summary import Row, plot_rows, summarise
from prefsculpt.models.loading import default_cache_dir, load_model, load_tokenizer, resolve_model_dir
from prefsculpt.tracking.runs import resolve_tracking_uri, stage_run

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
            tmp = d / f".{t}.{uuid.uuid4().hex[:6]}.parquet"
            df.to_parquet(tmp, index=False)
            os.replace(tmp, d / f"{t}.parquet")
        tmp = self.root / f".{name}.{uuid.uuid4().hex[:6]}.json"
        tmp.write_text(json.dumps({"tables": sorted(tables)}))
        os.replace(tmp, self.root / f"{name}.json")


class Evaluator:
    """Lazily loaded models and memoised per-item tables of ``policy`` and ``base``."""

    def __init__(self, cfg: DictConfig, inputs: EvalInputs, base_dir: Path, policy: ResolvedPolicy, cache: BaseCache):
        self.cfg, self.ec, self.inp, self.policy, self.cache = cfg, cfg.eval, inputs, policy, cache
        self.paths = {"policy": policy.path, "base": base_dir}
        self.same = policy.source == "base" or policy.digest == model_digest(base_dir)
        self.tok = load_tokenizer(policy.path)
        self._models: dict[str, Any] = {}
        self._tables: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}

    def model(self, which: str) -> Any:
        which = "base" if self.same else which
        if which not in self._models:
            self._models[which] = load_model(self.paths[which], str(self.cfg.model.dtype)).eval()
        return self._models[which]

    def tables(self, name: str, which: str) -> dict[str, pd.DataFrame]:
        which = "base" if self.same else which
        if (name, which) not in self._tables:
            got = self.cache.get(name) if which == "base" else None
            if got is None:
                got = COMPUTE[name](self, which)
                if which == "base":
                    self.cache.put(name, got)
            self._tables[(name, which)] = got
        return self._tables[(name, which)]

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
        out[f"opinion_{k}"] = syc.score_opinion(m, tok, items, bt, int(s.max_prompt_tokens))
    for k, items in ev.inp.suggested.items():
        out[f"suggested_{k}"] = syc.score_suggested(m, tok, items, bt, int(s.max_prompt_tokens))
    for k, items in ev.inp.are_you_sure.items():
        out[f"are_you_sure_{k}"] = syc.score_are_you_sure(m, tok, items, bt, int(s.max_prompt_tokens))
    return out


def _style(ev: Evaluator, which: str) -> dict[str, pd.DataFrame]:
    st, prompts = ev.ec.style, ev.inp.style_prompts
    rolls = sty.generate_greedy(ev.model(which), ev.tok, [p["prompt"] for p in prompts], int(st.max_new_tokens),
                                int(st.batch_size))
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
    if table == "planted":
        return [(f"syc/planted/{c}", c) for c in ("p_agree", "p_agree_neutral", "shift")]
    for prefix, cols in (("opinion_", (("p_match", "p_match"), ("match_rate", "match_argmax"))),
                         ("suggested_", (("shift", "shift"), ("switch_rate", "switched"))),
                         ("are_you_sure_", (("drop", "drop"), ("flip_rate", "flipped")))):
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


def _summarise_eval(ev: Evaluator, name: str) -> tuple[list[Row], dict[str, pd.DataFrame]]:
    ec = ev.ec
    pol = ev.tables(name, "policy")
    base = ev.tables(name, "base") if ec.compare_base else {}
    boot = (int(ec.bootstrap), float(ec.ci), int(ec.seed))
    rows: list[Row] = []
    logged = {}
    for t, df in pol.items():
        b = base.get(t)
        if t == "preference":
            if b is None:
                b = ev.tables(name, "base")[t]  # the reference log-probs are needed either way
            df = cap.preference_table(df, b, float(ec.capability.beta))
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
                                     ev.tok.pad_token_id or 0, int(ec.batch_tokens))
        kl["id"] = [ev.inp.style_prompts[i]["id"] for i in kl["row"]]
        rows += summarise(kl, None, [("cap/kl/mean_token", "kl_mean"), ("cap/kl/sum", "kl_sum")], *boot)
        logged["kl"] = kl
    return rows, logged


def _log_eval(name: str, rows: list[Row], tables: dict[str, pd.DataFrame], extra: dict[str, float],
              summary: list[dict]) -> dict[str, float]:
    metrics = {k: v for r in rows for k, v in r.metrics().items()} | extra
    mlflow.log_metrics(metrics)
    for t, df in tables.items():
        mlflow.log_table(df.drop(columns=[c for c in _ID_COLS if c in df.columns]), f"evals/{name}/{t}.json")
    if any(r.base is not None for r in rows):
        import matplotlib.pyplot as plt

        fig = plot_rows(rows, f"{name}: policy vs base (95% CI; Δ = paired difference)")
        mlflow.log_figure(fig, f"evals/plots/{name}.png")
        plt.close(fig)
    summary.extend(r.record() for r in rows)
    mlflow.log_dict({"rows": summary}, "evals/summary.json")  # rewritten after each eval: partial results
    return metrics


#: mlflow.genai.evaluate's defaults (10 row workers x 10 scorer workers, traces exported by 10 async
#: threads) exhaust a local SQLAlchemy store's connection pool (5 + 10): every trace then waits 30 s
#: and is lost ("QueuePool limit ... reached"). Code scorers need no parallelism; a variable the user
#: set is left alone.
GENAI_ENV = {"MLFLOW_GENAI_EVAL_MAX_WORKERS": "2", "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS": "1",
             "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}


@contextlib.contextmanager
def _genai_env() -> Iterator[None]:
    added = [k for k in GENAI_ENV if k not in os.environ]
    os.environ.update({k: GENAI_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _genai_style(tables: dict[str, pd.DataFrame], feats: dict) -> None:
    """The style responses through ``mlflow.genai.evaluate`` with code scorers (its evaluation views)."""
    from mlflow.genai.scorers import scorer

    def make(fname: str, pat: Any):
        def count(outputs) -> int:
            return len(pat.findall(str(outputs)))
        return scorer(count, name=f"style_{fname}")

    df = tables["responses"]
    data = [{"inputs": {"prompt": p}, "outputs": t} for p, t in zip(df.prompt, df.text, strict=True)]
    scorers = [make(f, p) for f, p in feats.items()]
    try:
        with _genai_env():
            mlflow.genai.evaluate(data=data, scorers=scorers)
    except Exception as exc:  # an optional view: never lose the evaluation over it
        log.warning("mlflow.genai.evaluate failed (%s); the style metrics and tables are logged anyway", exc)
        mlflow.set_tag("prefsculpt.genai_error", str(exc)[:500])


def cache_key(cfg: DictConfig, base_digest: str, inputs: EvalInputs) -> str:
    ec = cfg.eval
    key = {"model": base_digest, "dtype": str(cfg.model.dtype), "inputs": inputs.fingerprint(),
           "style": [int(ec.style.max_new_tokens)], "syc": int(ec.sycophancy.max_prompt_tokens),
           "named": OmegaConf.to_container(cfg.named_concepts) if "named_concepts" in cfg else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    ec = cfg.eval
    unknown = sorted(set(ec.evals) - set(EVALS))
    if unknown:
        raise ValueError(f"eval.evals: unknown evaluation(s) {unknown}; choose from {list(EVALS)}")
    t0 = time.perf_counter()
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    cache_root = Path(cfg.cache_dir) if cfg.get("cache_dir") else default_cache_dir()
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.cache_dir)
    policy = resolve_policy(ec.policy, base_dir, cache_root)  # fails first, naming the URI
    inputs = load_inputs(cfg)  # every external file validated before any compute
    shift_src: ShiftSources | None = resolve_shift_sources(cfg, cache_root) if "shift" in ec.evals else None
    base_digest = model_digest(base_dir)
    cache = BaseCache(cache_root / "evals" / "base" / cache_key(cfg, base_digest, inputs))

    with stage_run(cfg, "evaluate") as run:
        mlflow.set_tags({"prefsculpt.policy": policy.spec, "prefsculpt.policy_source": policy.source,
                         "prefsculpt.policy_digest": policy.digest, "prefsculpt.base_digest": base_digest,
                         **({"prefsculpt.policy_run_id": policy.run_id} if policy.run_id else {})})
        ev = Evaluator(cfg, inputs, base_dir, policy, cache)
        metrics: dict[str, float] = {}
        summary: list[dict] = []
        timings = {}
        for name in ec.evals:
            t1 = time.perf_counter()
            if name == "shift":
                rows, tables, extra = run_shift(ev, shift_src)
            else:
                rows, tables = _summarise_eval(ev, name)
                extra = {}
            timings[f"time/{name}_s"] = time.perf_counter() - t1
            metrics |= _log_eval(name, rows, tables, extra | {f"time/{name}_s": timings[f"time/{name}_s"]}, summary)
            if name == "style" and ec.genai:
                _genai_style(ev.tables("style", "policy"),
                             sty.compile_features(OmegaConf.to_container(cfg.named_concepts) if "named_concepts" in cfg else None))
            log.info("evaluate: %s done in %.1f s", name, timings[f"time/{name}_s"])
        total = time.perf_counter() - t0
        mlflow.log_metric("time/total_s", total)
        log.info("evaluate: %s finished in %.1f s (run %s)", policy.spec, total, run.info.run_id)
        return {"run_id": run.info.run_id, "metrics": metrics | {"time/total_s": total}, "policy": policy.spec,
                "policy_path": str(policy.path), "summary": summary}
