import numpy as np
import pandas as pd
import pytest
import yaml

from prefsculpt.audit.decisions import (
    Decisions,
    DecisionsError,
    decisions_hash,
    propose_decisions,
    write_decisions,
)
from prefsculpt.shaping.decisions import load_decisions

KNOWN = ["latent:1", "latent:2", "cluster:0", "named:emoji"]


@pytest.fixture
def hypotheses():
    return pd.DataFrame({
        "concept": ["cluster:0", "latent:2", "length", "named:emoji"],
        "label": ["' absolutely' · 'You'", "'\\n'", "length", "emoji"],
        "direction": ["chosen_more", "chosen_more", "chosen_more", "chosen_less"],
        "d_z": np.array([0.812345, 0.5, 0.4, -0.2]),
        "q": np.array([1e-30, 2e-5, 0.001, np.nan]),
        "rank": [1, 2, 3, 4],
        "members": [["latent:1", "latent:3"], None, None, None],
    })


def test_proposal_lists_every_hypothesis_allowed_and_round_trips(hypotheses, tmp_path):
    d = propose_decisions(hypotheses, top_k=None, audit_run_id="abc")
    assert [e["concept"] for e in d["concepts"]] == hypotheses["concept"].tolist()
    first = d["concepts"][0]
    assert first["action"] == "allow" and first["method"] == "score" and first["strength"] == 0.0
    assert first["label"] == "' absolutely' · 'You'" and first["effect"] == pytest.approx(0.8123)
    assert first["members"] == ["latent:1", "latent:3"]
    assert "q" not in d["concepts"][3]  # NaN is left out, not written as .nan
    assert len(propose_decisions(hypotheses, top_k=2)["concepts"]) == 2

    path = write_decisions(d, tmp_path / "decisions.yaml")
    text = path.read_text()
    assert text.startswith("# prefsculpt decisions") and "strength:" in text
    dec = load_decisions(path, KNOWN)
    assert isinstance(dec, Decisions) and len(dec.entries) == 4
    assert dec.active() == []
    assert dec.hash == decisions_hash(path) == decisions_hash(d)


def test_edited_file_gives_signed_strengths(hypotheses, tmp_path):
    d = propose_decisions(hypotheses)
    d["concepts"][0].update(action="suppress", method="steer", strength=2)
    d["concepts"][1].update(action="amplify", strength=0.5, note="wanted")
    d["concepts"][2].update(action="suppress", method="filter", strength=1.0, share=0.2)
    d["concepts"][3].update(action="suppress", method="ablate", strength=0)
    dec = load_decisions(write_decisions(d, tmp_path / "d.yaml"), KNOWN)
    assert [(x.concept, x.lam) for x in dec.active()] == [
        ("cluster:0", 2.0), ("latent:2", -0.5), ("length", 1.0), ("named:emoji", 0.0)]
    assert dec.get("length").params == {"share": 0.2}
    assert load_decisions(dec.to_dict(), KNOWN).entries == dec.entries
    assert dec.get("latent:2").note == "wanted"
    assert dec.get("latent:99").action == "allow"  # unlisted = allowed


def test_every_offending_entry_is_listed(tmp_path):
    bad = {
        "version": 1,
        "concepts": [
            {"concept": "latent:1", "action": "allow", "method": "score", "strength": 0.0},  # fine
            {"concept": "latent:999", "action": "suppress", "method": "score", "strength": 1.0},
            {"concept": "latent:2", "action": "supress", "method": "score", "strength": 1.0},
            {"concept": "cluster:0", "action": "suppress", "method": "magic", "strength": 1.0},
            {"concept": "named:emoji", "action": "suppress", "method": "filter", "strength": -1},
            {"concept": "length", "action": "suppress", "method": "score", "strength": "high"},
            {"concept": "latent:1", "action": "suppress"},
            {"concept": "latent:2", "action": "allow", "method": "score", "strength": 0, "stregth": 3},
            "just a string",
            {"concept": "latent:1", "action": "suppress", "method": "filter", "strength": 1, "share": 1.5},
        ],
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(DecisionsError) as ei:
        load_decisions(path, KNOWN)
    msg = str(ei.value)
    assert str(path) in msg
    for expected in [
        "entry 2 (latent:999): unknown concept 'latent:999'",
        "entry 3 (latent:2): unknown action 'supress' (did you mean 'suppress'?)",
        "entry 4 (cluster:0): unknown method 'magic'",
        "entry 5 (named:emoji): negative strength -1",
        "entry 6 (length): strength must be a finite number >= 0, got 'high'",
        "entry 7 (latent:1): missing field 'method'",
        "entry 7 (latent:1): missing field 'strength'",
        "entry 8 (latent:2): unknown field 'stregth' (did you mean 'strength'?)",
        "entry 9: expected a mapping",
        "entry 10 (latent:1): share 1.5 must lie in (0, 1)",
    ]:
        assert expected in msg, expected
    assert "entry 1 " not in msg  # the good entry is not blamed
    assert "length): unknown concept" not in msg  # built-ins are always known


def test_duplicates_structure_and_yaml_errors(tmp_path):
    dup = {"concepts": [{"concept": "latent:1", "action": "allow", "method": "score", "strength": 0}] * 2}
    with pytest.raises(DecisionsError, match=r"entry 2 \(latent:1\): duplicate of entry 1"):
        load_decisions(dup, KNOWN)
    with pytest.raises(DecisionsError, match="'concepts:' list"):
        load_decisions({"latent:1": "suppress"}, KNOWN)
    broken = tmp_path / "b.yaml"
    broken.write_text("concepts: [\n  - {concept: latent:1")
    with pytest.raises(DecisionsError, match="not valid YAML"):
        load_decisions(broken, KNOWN)
    with pytest.raises(DecisionsError, match="does not exist"):
        load_decisions(tmp_path / "missing.yaml", KNOWN)
    # known_concepts=None skips only the concept check
    assert load_decisions({"concepts": [{"concept": "latent:77", "action": "allow", "method": "score",
                                         "strength": 0}]}, None).entries[0].concept == "latent:77"


def test_hash_ignores_comments_and_order_but_not_content(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("# c\nversion: 1\nconcepts:\n- {concept: latent:1, action: allow, method: score, strength: 0.0}\n")
    b = tmp_path / "b.yaml"
    b.write_text("concepts:\n- strength: 0.0\n  method: score\n  action: allow\n  concept: latent:1\nversion: 1\n")
    assert decisions_hash(a) == decisions_hash(b)
    b.write_text(b.read_text().replace("strength: 0.0", "strength: 0.5"))
    assert decisions_hash(a) != decisions_hash(b)
