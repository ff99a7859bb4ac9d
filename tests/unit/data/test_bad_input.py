"""Bad input is named: every kind of broken file ends in a DataSourceError / DataValidationError that
names the file, the row and the fix, and any byte string at all loads or fails that way (hypothesis)."""

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefsculpt.data import DataSourceError, DataValidationError, load_pairs
from prefsculpt.data.safejson import MAX_DEPTH

ROW = {"id": "a", "prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
LINE = json.dumps(ROW) + "\n"


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


#: kind -> (file name, bytes, load_pairs kwargs, error type, phrases its message must hold)
BAD_FILES = {
    "gzip_truncated": ("t.jsonl.gz", gzip.compress((LINE * 200).encode())[:60], {}, DataSourceError,
                       ["t.jsonl.gz", "gzip file is truncated", "line 1", "gzip -t"]),
    "gzip_not_gzip": ("n.jsonl.gz", LINE.encode(), {}, DataSourceError,
                      ["n.jsonl.gz", "not gzip data", "drop the .gz suffix"]),
    "gzip_corrupt": ("c.jsonl.gz", (lambda b: b[:20] + bytes(x ^ 0x55 for x in b[20:40]) + b[40:])(
        gzip.compress((LINE * 50).encode())), {}, DataSourceError, ["c.jsonl.gz", "gzip file is", "Re-download"]),
    "csv_field_over_131072": (
        "big.csv", b"prompt,chosen,rejected\nq1,a,b\nq2," + b"x" * 140_000 + b",b\n", {}, DataValidationError,
        ["big.csv row 3", "too_long", "chosen has 140000 characters", "data.max_chars=32000", "data.on_error=skip"]),
    "json_nested_too_deep": ("deep.jsonl", _jsonl(ROW, {**ROW, "id": "b", "m": json.loads(_nested(70))}), {},
                             DataValidationError, ["deep.jsonl row 2", "nested more than 64 levels", "flatten"]),
    "json_nested_past_recursion": (
        "deeper.jsonl", (LINE + '{"id": "b", "m": ' + _nested(100_000) + "}\n").encode(), {}, DataValidationError,
        ["deeper.jsonl row 2", "nested more than 64 levels deep at column 81", "flatten"]),
    "json_file_nested_past_recursion": (
        "deep.json", ("[" + json.dumps(ROW) + ",\n" + _nested(100_000) + "]").encode(), {}, DataSourceError,
        ["deep.json", "nested more than 64 levels deep at line 2 column 64", "flatten"]),
    "integer_5000_digits": ("int.jsonl", (LINE + '{"id": "b", "prompt": "Q", "chosen": "x", "rejected": "y", '
                                          '"score": ' + "7" * 5000 + "}\n").encode(), {}, DataValidationError,
                            ["int.jsonl row 2 (id 'b'): out_of_range", "field score", "5000 digits",
                             "write it as a string"]),
    "float_out_of_range": ("f.json", json.dumps([ROW, {**ROW, "id": "b"}]).replace('"b"', '"b", "w": 1e999')
                           .encode(), {}, DataValidationError, ["f.json row 2 (id 'b'): out_of_range", "1e999"]),
    "tag_not_a_number": ("tags.jsonl", _jsonl(ROW, {**ROW, "id": "b", "chosen_tags": {"len": "long"}}), {},
                         DataValidationError, ["tags.jsonl row 2", "chosen_tags.len must be a finite number"]),
    "zero_valid_rows_skip": ("none.jsonl", _jsonl({"id": "a", "question": "Q"}, {"id": "b", "question": "R"}),
                             {"on_error": "skip"}, DataValidationError,
                             ["none of the 2 rows in", "none.jsonl row 1 (id 'a'): missing_field",
                              "skip cannot help", "data.columns"]),
    "empty_file": ("empty.csv", b"prompt,chosen,rejected\n", {}, DataSourceError, ["empty.csv", "holds no rows"]),
    "unknown_format": ("ok.jsonl", LINE.encode(), {"fmt": "xml"}, DataSourceError,
                       ["data.format='xml'", "auto, plain, chat, hh_rlhf"]),
    "utf16_bom": ("u16.jsonl", "\ufeff".encode("utf-16-le") + LINE.encode("utf-16-le"), {}, DataSourceError,
                  ["u16.jsonl", "UTF-16", "Re-save it as UTF-8"]),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_each_bad_file_gives_a_named_error(tmp_path, kind):
    name, data, kwargs, err, phrases = BAD_FILES[kind]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(err) as exc:
        load_pairs(str(tmp_path / name), **kwargs)
    for phrase in phrases:
        assert phrase in str(exc.value), (phrase, str(exc.value))


def test_skip_still_loads_good_rows_beside_each_row_level_problem(tmp_path):
    p = tmp_path / "mixed.jsonl"
    bad = ['{"id": "n", "prompt": "Q", "chosen": "x", "rejected": "y", "m": ' + _nested(MAX_DEPTH + 5) + "}",
           '{"id": "i", "prompt": "Q", "chosen": "x", "rejected": "y", "m": ' + "1" * 5000 + "}",
           '{"id": "f", "prompt": "Q", "chosen": "x", "rejected": "y", "m": -Infinity}']
    ok_deep = '{"id": "ok", "prompt": "Q2", "chosen": "x", "rejected": "y", "m": ' + _nested(MAX_DEPTH - 1) + "}"
    p.write_text("\n".join([LINE.strip(), *bad, ok_deep]) + "\n")
    res = load_pairs(str(p), on_error="skip")
    assert [x.id for x in res.pairs] == ["a", "ok"]
    assert [(e.row, e.reason) for e in res.skipped] == [(2, "malformed"), (3, "out_of_range"), (4, "out_of_range")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_is_ignored_for_json_too(tmp_path, suffix):
    body = LINE if suffix == ".jsonl" else json.dumps([ROW])
    p = tmp_path / f"bom{suffix}"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [x.id for x in load_pairs(str(p)).pairs] == ["a"]
    gz = tmp_path / f"bom{suffix}.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + body.encode()))
    assert [x.id for x in load_pairs(str(gz)).pairs] == ["a"]


def test_a_url_is_named_without_its_password():
    with pytest.raises(DataSourceError) as exc:
        load_pairs("s3://AKIAX:s3cr3t/key@bucket/pairs.jsonl")
    assert "'s3://AKIAX:***@bucket/pairs.jsonl' is a URL" in str(exc.value) and "s3cr3t" not in str(exc.value)


def test_csv_bom_line_separators_and_unterminated_quote_keep_working(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nq1,a,b\n")
    assert [x.prompt for x in load_pairs(str(p)).pairs] == ["q1"]
    p = tmp_path / "sep.csv"  # U+2028, U+2029, \x85 and \r inside quoted fields stay in the text
    p.write_text('prompt,chosen,rejected\n"one\u2028two\u2029three",a,b\n"x\ry\x85z",c,d\n', encoding="utf-8",
                 newline="")
    assert [x.prompt for x in load_pairs(str(p)).pairs] == ["one\u2028two\u2029three", "x\ry\x85z"]
    p = tmp_path / "open.csv"
    p.write_bytes(b'prompt,chosen,rejected\nq1,a,b\nq2,"c,d\nq3,e,f\n')
    res = load_pairs(str(p), on_error="skip")
    assert [x.prompt for x in res.pairs] == ["q1"]
    (err,) = res.skipped
    assert err.row == 4 and err.reason == "malformed" and "quoted field opened on line 3 is never closed" in err.detail


# ---------------------------------------------------------------- property-based: any bytes in


FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Bytes that look like the formats (so the fuzzer reaches the row checks, not just the first byte).
_PIECES = st.sampled_from([
    b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\r", b"\\", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00",
    b'"prompt"', b'"chosen"', b'"rejected"', b'"id"', b'"metadata"', b'"chosen_tags"', b"1e999", b"-0",
    b"9" * 30, b"NaN", b"Infinity", b"null", b"true", b'"x"', b"prompt,chosen,rejected\n", b"\xe9", b"\xc3\xa9",
    b'"[{\\"role\\": \\"user\\", \\"content\\": \\"q\\"}]"', b"\n\nHuman: hi\n\nAssistant: yo",
    "\u2028".encode(),
])
_TEXT = st.text(max_size=12)
#: Whole rows (mostly valid) mixed with noise lines, as JSONL and as CSV, so rows do load sometimes.
_JSON_LINE = st.builds(lambda p, c, r: json.dumps({"prompt": p, "chosen": c, "rejected": r}).encode(),
                       _TEXT, _TEXT, _TEXT)
_CSV_LINE = st.lists(_TEXT, min_size=3, max_size=3).map(
    lambda f: ",".join('"' + x.replace('"', '""') + '"' for x in f).encode("utf-8", "surrogatepass"))
_LINES = st.lists(st.one_of(_JSON_LINE, _CSV_LINE, st.binary(max_size=30)), max_size=6)
ANY_BYTES = st.one_of(st.binary(max_size=400), st.lists(_PIECES, max_size=40).map(b"".join),
                      _LINES.map(b"\n".join), _LINES.map(lambda ls: b"prompt,chosen,rejected\n" + b"\n".join(ls)))


def _load_named_or_rows(path) -> None:
    try:
        res = load_pairs(str(path), on_error="skip")
    except (DataSourceError, DataValidationError) as exc:
        assert path.name in str(exc) or "data." in str(exc), str(exc)
        return
    assert res.pairs and res.n_rows >= len(res.pairs)
    for p in res.pairs:  # what comes out is usable downstream
        json.dumps(p.to_record())


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json", ".jsonl.gz"])
@FUZZ
@given(data=ANY_BYTES, compress=st.booleans())
def test_any_bytes_load_or_fail_named(tmp_path, suffix, data, compress):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") and compress else data)
    _load_named_or_rows(path)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["id", "prompt", "chosen", "rejected", "metadata",
                                                       "chosen_tags", "x"]),
                                     st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                                                  st.text(max_size=8),
                                                  lambda c: st.lists(c, max_size=3) |
                                                  st.dictionaries(st.text(max_size=3), c, max_size=3),
                                                  max_leaves=8)), max_size=5))
def test_any_json_records_load_or_fail_named(tmp_path, rows):
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _load_named_or_rows(path)
