import gzip
import json

import pandas as pd
import pytest

from prefsculpt.data import DataSourceError, DataValidationError, load_pairs
from prefsculpt.data.formats import parse_hh_transcript, split_shared_prompt

GOOD = {"id": "a", "prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as fh:
        for r in rows:
            fh.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            fh.write(line)
    return path


def test_plain_jsonl_roundtrip(tmp_path):
    rows = [{**GOOD, "id": f"r{i}", "prompt": f"Q{i}?", "extra": i} for i in range(5)]
    res = load_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [p.id for p in res.pairs] == [f"r{i}" for i in range(5)]
    assert res.pairs[2].prompt == "Q2?" and res.pairs[2].metadata["extra"] == 2
    assert res.skipped == [] and res.n_rows == 5


BAD_CASES = {
    "malformed": b'{"id": "x", "prompt": \n',
    "undecodable": b'{"id": "u", "prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
    "missing_field": json.dumps({"id": "m", "prompt": "Q", "chosen": "a"}).encode() + b"\n",
    "wrong_type": json.dumps({"id": "w", "prompt": "Q", "chosen": 3, "rejected": "b"}).encode() + b"\n",
    "empty_response": json.dumps({"id": "e", "prompt": "Q", "chosen": "  ", "rejected": "b"}).encode() + b"\n",
    "identical_responses": json.dumps({"id": "i", "prompt": "Q", "chosen": "same", "rejected": "same"}).encode()
    + b"\n",
    "too_long": json.dumps({"id": "t", "prompt": "Q", "chosen": "x" * 200, "rejected": "b"}).encode() + b"\n",
    "duplicate_id": json.dumps({**GOOD, "prompt": "another"}).encode() + b"\n",
    "empty_prompt": json.dumps({"id": "p", "prompt": "", "chosen": "a", "rejected": "b"}).encode() + b"\n",
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_each_error_kind_names_row_and_reason(tmp_path, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD], raw_lines=[BAD_CASES[reason]])
    with pytest.raises(DataValidationError) as exc:
        load_pairs(str(path), max_chars=100)
    msg = str(exc.value)
    assert "row 2" in msg and reason in msg and "data.on_error=skip" in msg
    assert [e.reason for e in exc.value.errors] == [reason]


def test_skip_lists_exactly_the_bad_rows(tmp_path):
    bad = [BAD_CASES[k] for k in sorted(BAD_CASES)]
    rows = [GOOD] + [{**GOOD, "id": f"ok{i}", "prompt": f"q{i}"} for i in range(2)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows, raw_lines=bad)
    res = load_pairs(str(path), on_error="skip", max_chars=100)
    assert [p.id for p in res.pairs] == ["a", "ok0", "ok1"]
    assert [e.row for e in res.skipped] == list(range(4, 4 + len(bad)))
    assert sorted(res.skip_counts()) == sorted(BAD_CASES)
    # duplicate id: only the second occurrence is rejected, and it names the first
    dup = next(e for e in res.skipped if e.reason == "duplicate_id")
    assert "row 1" in dup.detail


def test_hh_transcripts(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did...",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: "},
    ]
    p = tmp_path / "hh.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    res = load_pairs(str(p), fmt="hh_rlhf", on_error="skip")
    (pair,) = res.pairs
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.chosen == "Why did..." and pair.rejected == "No."
    assert res.skipped[0].row == 2 and res.skipped[0].reason == "empty_response"
    # auto-detects the format too
    assert load_pairs(str(p), on_error="skip").pairs[0].chosen == "Why did..."


def test_hh_divergence_over_several_turns_keeps_the_rest():
    c = parse_hh_transcript("\n\nHuman: Q\n\nAssistant: A1\n\nHuman: more\n\nAssistant: A2")
    r = parse_hh_transcript("\n\nHuman: Q\n\nAssistant: B1")
    prompt, chosen, rejected = split_shared_prompt(c, r)
    assert prompt == [{"role": "user", "content": "Q"}]
    assert chosen == "A1\n\nHuman: more\n\nAssistant: A2" and rejected == "B1"


def test_chat_messages_ultrafeedback_style(tmp_path):
    rows = [{
        "prompt_id": "x1",
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
    }]
    res = load_pairs(str(write_jsonl(tmp_path / "c.jsonl", rows)), columns={"id": "prompt_id"})
    assert res.pairs[0].id == "x1" and res.pairs[0].prompt == "Q" and res.pairs[0].chosen == "good"
    bad = [{**rows[0], "chosen": [{"role": "robot", "content": "x"}]}]
    with pytest.raises(DataValidationError, match="unknown role"):
        load_pairs(str(write_jsonl(tmp_path / "c2.jsonl", bad)))


def test_column_mapping_and_file_types(tmp_path):
    df = pd.DataFrame({"question": ["a?", "b?"], "good": ["1", "2"], "bad": ["3", "4"]})
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(df.to_json(orient="records"))
    import datasets

    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "dsfolder"))
    for name in ("d.parquet", "d.csv", "d.json", "dsfolder"):
        res = load_pairs(str(tmp_path / name), columns=cols)
        assert [p.prompt for p in res.pairs] == ["a?", "b?"], name
        # ids default to "<file stem>-<row>"; for CSV the row is the file line (the header is line 1)
        first_row = 2 if name.endswith(".csv") else 1
        assert res.pairs[1].chosen == "2" and res.pairs[0].id.endswith(f"{first_row:06d}"), name


def test_csv_undecodable_row_is_rejected_alone(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"prompt,chosen,rejected\nq1,a,b\nq2,caf\xe9,b\nq3,c,d\n")
    res = load_pairs(str(p), on_error="skip")
    assert [x.prompt for x in res.pairs] == ["q1", "q3"]
    assert [(e.row, e.reason) for e in res.skipped] == [(3, "undecodable")]


def test_source_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DataSourceError, match="no such file"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataSourceError, match="unknown file type"):
        load_pairs(str(tmp_path / "x.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match="hub access is off"):
        load_pairs("someone/some-dataset")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataSourceError, match="broken.json"):
        load_pairs(str(tmp_path / "broken.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataSourceError, match="no rows"):
        load_pairs(str(tmp_path / "empty.jsonl"))


def test_bad_policy_and_format_values(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(ValueError, match="on_error"):
        load_pairs(str(p), on_error="ignore")
    with pytest.raises(ValueError, match="format"):
        load_pairs(str(p), fmt="xml")
