"""``main`` on someone else's preference data, from prepare to a registered version.

The hh-rlhf helpful-base test file and the UltraFeedback sample rewritten as chat messages
(``../shared/data``, skipped when absent) on the tiny random llama: the on-target objective is
preference accuracy on the data's own held-out split and sycophancy comes from the opinion A/B set
shipped inside the package (the planted ``clean`` pairs do not exist for this data). About five
minutes each on 2 CPU cores.
"""

import json

import mlflow
import pytest

from prefsculpt.cli import run_stage
from prefsculpt.core.names import Tag
from prefsculpt.evals.inputs import SHIPPED_OPINION

pytestmark = pytest.mark.integration

SHIPPED_METRIC = f"syc/opinion/{SHIPPED_OPINION.stem}/p_match"


def _ultrafeedback_chat(shared_data, tmp_path):
    """UltraFeedback rows as chat: chosen/rejected are [user, assistant] message lists."""
    out = tmp_path / "uf_chat.jsonl"
    with open(shared_data / "ultrafeedback-sample" / "eval_clean.jsonl") as f, open(out, "w") as g:
        for line in f:
            r = json.loads(line)
            user = {"role": "user", "content": r["prompt"]}
            g.write(json.dumps({"id": f"uf-{r['source_index']}",
                                **{k: [user, {"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}})
                    + "\n")
    return out


@pytest.mark.parametrize("source", ["hh_rlhf", "ultrafeedback_chat"])
def test_main_on_own_data_ends_with_a_registered_version(source, mlflow_uri, tmp_path, tiny_model_dir, shared_data):
    if source == "hh_rlhf":
        data = ["data=hh_rlhf", f"data.path={shared_data / 'hh-rlhf' / 'helpful-base' / 'test.jsonl.gz'}"]
    else:
        data = ["data=file", f"data.path={_ultrafeedback_chat(shared_data, tmp_path)}", "data.format=chat"]
    overrides = [
        "experiment=tiny", *data, "data.on_error=skip", "data.limit=120",
        "data.tokenize.max_prompt_tokens=96", "data.tokenize.max_response_tokens=48",
        f"model.name_or_path={tiny_model_dir}", "sae.layer=2", f"cache_dir={tmp_path / 'cache'}",
        f"search.storage=sqlite:///{tmp_path / 'optuna.db'}", "search.n_trials=2", "search.trial_max_pairs=24",
        "eval.bootstrap=50", "eval.sycophancy.max_items=24", "eval.sycophancy.planted_probes=0",
        "eval.capability.known_answer=0", "eval.style.n_prompts=4", "eval.style.max_new_tokens=8",
        "promote.model_name=hh-policy",
    ]
    out = run_stage("main", overrides)
    assert out["stages"].keys() >= {"prepare", "sae", "audit", "search", "evaluate", "promote"}

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("hh-policy", "candidate")
    tags = mv.tags
    # preference accuracy on held-out hh-rlhf pairs (the on-target objective) and the sycophancy increase
    on_target, syc = float(tags[Tag.ON_TARGET]), float(tags[Tag.SYC_INCREASE])
    assert 0.0 <= on_target <= 1.0 and -1.0 <= syc <= 1.0
    assert tags[f"{Tag.GATE_PREFIX}sycophancy_vs_baseline"].startswith(("pass", "FAIL"))
    assert tags[f"{Tag.GATE_PREFIX}on_target_vs_baseline"].startswith(("pass", "FAIL"))

    ev = client.get_run(tags[Tag.EVAL_RUN]).data.metrics
    assert ev["cap/pref/implicit_acc"] == pytest.approx(on_target, abs=1e-5)
    assert 0.0 <= ev[SHIPPED_METRIC] <= 1.0 and f"{SHIPPED_METRIC}_diff" in ev
    assert not any(k.startswith("syc/planted/") for k in ev)  # turned off: only the shipped real set
    # held-out pairs were scored, not the planted clean split (which this data does not have)
    table = mlflow.load_table("evals/capability/preference.json", run_ids=[tags[Tag.EVAL_RUN]])
    assert 0 < len(table) <= 12 and table["id"].str.len().gt(0).all()
