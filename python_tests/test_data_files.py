"""sft_kernels.data.files: a user's CSV / TSV / JSON / JSON-lines files as a task the batching code takes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sft_kernels.data import FILE_EXTENSIONS, FileTaskSpec, TaskSpec, batches, load_files

ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("loved it", "pos")]


def write(path: Path, rows: list[dict], fmt: str = "") -> Path:
    """``rows`` (dicts with the same keys) written in the format of ``path``'s extension (or ``fmt``)."""
    fmt = fmt or path.suffix
    cols = list(rows[0])
    if fmt in (".csv", ".tsv"):
        sep = "," if fmt == ".csv" else "\t"
        lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment(path: Path, rows=ROWS) -> Path:
    return write(path, [{"text": t, "label": y} for t, y in rows])


# ----------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("ext", FILE_EXTENSIONS)
def test_each_format_round_trips(tmp_path, ext):
    spec, train, val = load_files(sentiment(tmp_path / f"train{ext}"))
    assert val is None
    assert isinstance(spec, FileTaskSpec) and isinstance(spec, TaskSpec)
    assert (spec.name, spec.text_a, spec.text_b, spec.num_labels, spec.is_regression) == \
        (f"train{ext}", "text", None, 2, False)
    assert train.column_names == ["text_a", "text_b", "label"]
    assert list(train["text_a"]) == [t for t, _ in ROWS]
    assert list(train["text_b"]) == [None] * 3
    assert list(train["label"]) == [1, 0, 1]


def test_csv_quoting_and_tsv_quotes_as_text(tmp_path):
    (tmp_path / "q.csv").write_text('text,label\n"one, two ""three""",0\n"line\nbreak",1\n', encoding="utf-8")
    _, train, _ = load_files(tmp_path / "q.csv")
    assert list(train["text_a"]) == ['one, two "three"', "line\nbreak"]
    (tmp_path / "q.tsv").write_text('text\tlabel\n"it\'s" good\t1\n"open quote\t0\n', encoding="utf-8")
    _, train, _ = load_files(tmp_path / "q.tsv")
    assert list(train["text_a"]) == ['"it\'s" good', '"open quote']


@pytest.mark.parametrize("layout", ["lines", "columns", "data_records", "data_columns"])
def test_json_layouts(tmp_path, layout):
    recs = [{"text": t, "label": y} for t, y in ROWS]
    cols = {"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]}
    text = {"lines": "\n".join(json.dumps(r) for r in recs),
            "columns": json.dumps(cols),
            "data_records": json.dumps({"version": "1", "data": recs}),
            "data_columns": json.dumps({"data": cols})}[layout]
    (tmp_path / "t.json").write_text(text, encoding="utf-8")
    spec, train, _ = load_files(tmp_path / "t.json")
    assert list(train["label"]) == [1, 0, 1] and spec.label2id == {"neg": 0, "pos": 1}


def test_bom_blank_lines_and_spaces_are_ignored(tmp_path):
    (tmp_path / "t.csv").write_text("\ufefftext,label\n  padded  , pos \n\nplain,neg\n", encoding="utf-8")
    _, train, _ = load_files(tmp_path / "t.csv")
    assert list(train["text_a"]) == ["padded", "plain"] and list(train["label"]) == [1, 0]


# ----------------------------------------------------------------------------------------------- columns

def test_sentence_pairs(tmp_path):
    rows = [{"label": 0, "sentence1": "a cat", "sentence2": "an animal"},
            {"label": 1, "sentence1": "a cat", "sentence2": "a car"}]
    spec, train, _ = load_files(write(tmp_path / "p.jsonl", rows))
    assert (spec.text_a, spec.text_b) == ("sentence1", "sentence2")
    assert list(train["text_a"]) == ["a cat", "a cat"] and list(train["text_b"]) == ["an animal", "a car"]


def test_explicit_text_columns(tmp_path):
    rows = [{"premise": "p1", "hypothesis": "h1", "note": "n1", "label": 0},
            {"premise": "p2", "hypothesis": "h2", "note": "n2", "label": 1}]
    path = write(tmp_path / "p.csv", rows)
    spec, train, _ = load_files(path, text_columns=["hypothesis", "premise"])
    assert (spec.text_a, spec.text_b) == ("hypothesis", "premise") and list(train["text_a"]) == ["h1", "h2"]
    spec, train, _ = load_files(path, text_columns="note")
    assert (spec.text_a, spec.text_b) == ("note", None) and list(train["text_a"]) == ["n1", "n2"]


@pytest.mark.parametrize("cols, expect", [
    (["sentence", "text", "label"], ("sentence", None)),
    (["idx", "text", "label"], ("text", None)),
    (["text_a", "text_b", "label"], ("text_a", "text_b")),
    (["id", "review", "label"], ("review", None)),  # the all-number id column is not text
    (["premise", "hypothesis", "label"], ("premise", "hypothesis")),
])
def test_default_text_columns(tmp_path, cols, expect):
    rows = [{c: (str(i) if c in ("id", "idx") else f"{c} {i}") if c != "label" else i % 2 for c in cols}
            for i in range(2)]
    spec, _, _ = load_files(write(tmp_path / "d.csv", rows))
    assert (spec.text_a, spec.text_b) == expect


def test_label_column_other_name(tmp_path):
    rows = [{"text": "x", "y": "b"}, {"text": "z", "y": "a"}]
    spec, train, _ = load_files(write(tmp_path / "t.csv", rows), label_column="y")
    assert spec.label2id == {"a": 0, "b": 1} and list(train["label"]) == [1, 0]


# ----------------------------------------------------------------------------------------------- labels

def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    rows = [("x", "neutral"), ("y", "positive"), ("z", "negative"), ("w", "neutral")]
    spec, train, _ = load_files(sentiment(tmp_path / "t.csv", rows))
    assert spec.label_names == ("negative", "neutral", "positive")
    assert spec.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert spec.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert spec.num_labels == 3 and not spec.is_regression and spec.metric_names == ("accuracy",)
    assert list(train["label"]) == [1, 2, 0, 1]


def test_label_names_fix_the_order(tmp_path):
    rows = [("x", "neutral"), ("y", "positive"), ("z", "negative")]
    spec, train, _ = load_files(sentiment(tmp_path / "t.csv", rows), label_names=["positive", "neutral", "negative"])
    assert spec.id2label == {0: "positive", 1: "neutral", 2: "negative"}
    assert list(train["label"]) == [1, 0, 2]


def test_integer_labels_are_class_ids(tmp_path):
    spec, train, _ = load_files(sentiment(tmp_path / "t.jsonl", [("x", 2), ("y", 0), ("z", 2)]))
    assert spec.num_labels == 3 and spec.label_names == ("0", "1", "2")  # class 1 absent, still a class
    assert list(train["label"]) == [2, 0, 2]
    assert train.features["label"].dtype == "int64"
    spec, _, _ = load_files(sentiment(tmp_path / "one.csv", [("x", 0), ("y", 0)]))
    assert spec.num_labels == 2 and not spec.is_regression  # one class seen: still a classifier
    spec, train, _ = load_files(sentiment(tmp_path / "t2.csv", [("x", 1), ("y", 0)]), num_labels=4)
    assert spec.num_labels == 4 and list(train["label"]) == [1, 0]


def test_integer_codes_via_label_names(tmp_path):
    spec, train, _ = load_files(sentiment(tmp_path / "stars.csv", [("x", 5), ("y", 1), ("z", 3)]),
                                label_names=[str(i) for i in range(1, 6)])
    assert spec.num_labels == 5 and list(train["label"]) == [4, 0, 2]


def test_same_label_in_csv_text_and_json_number(tmp_path):
    _, a, _ = load_files(sentiment(tmp_path / "t.csv", [("x", 1), ("y", 0)]))
    (tmp_path / "t.json").write_text('[{"text":"x","label":"1"},{"text":"y","label":0}]', encoding="utf-8")
    _, b, _ = load_files(tmp_path / "t.json")
    assert list(a["label"]) == list(b["label"]) == [1, 0]


@pytest.mark.parametrize("ext", [".csv", ".json"])
def test_float_labels_make_a_regression(tmp_path, ext):
    spec, train, _ = load_files(sentiment(tmp_path / f"t{ext}", [("x", 0.5), ("y", 4), ("z", 1.0)]))
    assert spec.is_regression and spec.num_labels == 1 and spec.metric_names == ("pearson", "spearman")
    assert spec.label2id == {} and spec.label_names == ()
    assert train.features["label"].dtype == "float32"
    assert list(train["label"]) == pytest.approx([0.5, 4.0, 1.0])


def test_integer_labels_with_num_labels_1_are_a_regression(tmp_path):
    spec, train, _ = load_files(sentiment(tmp_path / "t.csv", [("x", 1), ("y", 5)]), num_labels=1)
    assert spec.is_regression and list(train["label"]) == [1.0, 5.0]


def test_validation_uses_the_training_mapping(tmp_path):
    train_path = sentiment(tmp_path / "train.csv", [("x", "b"), ("y", "c"), ("z", "a")])
    val_path = sentiment(tmp_path / "dev.jsonl", [("v", "c"), ("w", "a")])  # no "b": mapping unchanged
    spec, train, val = load_files(train_path, val_path)
    assert spec.label2id == {"a": 0, "b": 1, "c": 2}
    assert list(train["label"]) == [1, 2, 0] and list(val["label"]) == [2, 0]
    assert val.features == train.features


def test_validation_of_a_regression(tmp_path):
    spec, _, val = load_files(sentiment(tmp_path / "t.csv", [("x", 0.5), ("y", 2)]),
                              sentiment(tmp_path / "v.csv", [("z", 3)]))
    assert spec.is_regression and list(val["label"]) == [3.0]


# ----------------------------------------------------------------------------------------------- bad input

def test_train_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_file not found: .*nope\.csv"):
        load_files(tmp_path / "nope.csv")


def test_validation_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"validation_file not found: .*dev\.csv"):
        load_files(sentiment(tmp_path / "t.csv"), tmp_path / "dev.csv")


def test_unsupported_extension(tmp_path):
    (tmp_path / "t.txt").write_text("text,label\nx,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.txt': unsupported extension '\.txt'; "
                                         r"use one of \.csv, \.tsv, \.json, \.jsonl"):
        load_files(tmp_path / "t.txt")


def test_missing_text_column(tmp_path):
    with pytest.raises(ValueError, match=r"text_columns 'sentence' is not a column of train_file '.*t\.csv'; "
                                         r"its columns are \['text', 'label'\]"):
        load_files(sentiment(tmp_path / "t.csv"), text_columns="sentence")


def test_missing_text_column_in_validation(tmp_path):
    val = write(tmp_path / "v.csv", [{"body": "x", "label": "pos"}])
    with pytest.raises(ValueError, match=r"text_columns 'text' is not a column of validation_file '.*v\.csv'"):
        load_files(sentiment(tmp_path / "t.csv"), val)


def test_missing_label_column(tmp_path):
    with pytest.raises(ValueError, match=r"label_column 'y' is not a column of train_file '.*t\.jsonl'; "
                                         r"its columns are \['text', 'label'\]"):
        load_files(sentiment(tmp_path / "t.jsonl"), label_column="y")


def test_ambiguous_default_text_columns(tmp_path):
    rows = [{"a": "x", "b": "y", "c": "z", "label": 0}]
    with pytest.raises(ValueError, match=r"text_columns not given and train_file '.*t\.csv'.*3 of them hold "
                                         r"text: \['a', 'b', 'c'\].*Pass text_columns"):
        load_files(write(tmp_path / "t.csv", rows))


@pytest.mark.parametrize("content", ["", "\n\n", "[]", "text,label\n"])
def test_empty_file(tmp_path, content):
    ext = ".json" if content == "[]" else ".csv"
    (tmp_path / f"t{ext}").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.(csv|json)' (is empty|has a header but no rows)"):
        load_files(tmp_path / f"t{ext}")


def test_empty_validation_file(tmp_path):
    (tmp_path / "v.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"validation_file '.*v\.jsonl' is empty"):
        load_files(sentiment(tmp_path / "t.csv"), tmp_path / "v.jsonl")


def test_empty_text_cell(tmp_path):
    with pytest.raises(ValueError, match=r"train_file '.*t\.csv': row 2 \(line 3\): empty text in text_columns "
                                         r"column 'text'"):
        load_files(sentiment(tmp_path / "t.csv", [("x", "a"), ("  ", "b")]))


def test_missing_text_in_json_record(tmp_path):
    (tmp_path / "t.json").write_text('[{"text": "x", "label": 0}, {"label": 1}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.json': row 2: empty text in text_columns"):
        load_files(tmp_path / "t.json")


def test_number_in_a_json_text_column(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "x", "label": 1}\n{"text": 5, "label": 0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.jsonl': row 2 \(line 2\): text_columns column 'text' "
                                         r"holds 5, not a string"):
        load_files(tmp_path / "t.jsonl")


def test_unparseable_label(tmp_path):
    rows = [("x", 1), ("y", 0), ("z", "1x"), ("w", 1)]
    with pytest.raises(ValueError, match=r"train_file '.*t\.csv': row 3 \(line 4\): cannot parse label '1x' in "
                                         r"label_column 'label': the column mixes numbers and names"):
        load_files(sentiment(tmp_path / "t.csv", rows))


@pytest.mark.parametrize("label", ["null", "true", '""', "[1]"])
def test_label_that_is_not_a_number_or_name(tmp_path, label):
    (tmp_path / "t.jsonl").write_text(f'{{"text": "x", "label": 1}}\n{{"text": "y", "label": {label}}}\n',
                                      encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.jsonl': row 2 \(line 2\): label_column 'label' holds "
                                         r".*a label must be a number or a non-empty name"):
        load_files(tmp_path / "t.jsonl")


def test_label_outside_num_labels(tmp_path):
    with pytest.raises(ValueError, match=r"train_file '.*t\.csv': row 2 \(line 3\): label '3' is outside "
                                         r"num_labels=3: labels must be class ids 0\.\.2"):
        load_files(sentiment(tmp_path / "t.csv", [("x", 0), ("y", 3)]), num_labels=3)


def test_negative_class_id(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): label '-1' is not a class id"):
        load_files(sentiment(tmp_path / "t.csv", [("x", -1), ("y", 1)]))


def test_float_labels_with_a_classifier_head(tmp_path):
    with pytest.raises(ValueError, match=r"num_labels=2, but train_file '.*t\.csv' has non-integer labels "
                                         r"\(row 1 \(line 2\): 0\.5\)"):
        load_files(sentiment(tmp_path / "t.csv", [("x", 0.5), ("y", 1)]), num_labels=2)


def test_num_labels_disagrees_with_label_names(tmp_path):
    with pytest.raises(ValueError, match=r"num_labels=3, but the labels of train_file '.*' name 2 classes"):
        load_files(sentiment(tmp_path / "t.csv"), num_labels=3)
    with pytest.raises(ValueError, match=r"num_labels=3 disagrees with the 2 label_names"):
        load_files(sentiment(tmp_path / "t.csv"), num_labels=3, label_names=["neg", "pos"])


def test_label_not_in_label_names(tmp_path):
    with pytest.raises(ValueError, match=r"row 2 \(line 3\): label 'neg' is not one of label_names: labels must "
                                         r"be one of \['pos', 'neutral'\]"):
        load_files(sentiment(tmp_path / "t.csv"), label_names=["pos", "neutral"])


def test_validation_label_not_seen_in_training(tmp_path):
    with pytest.raises(ValueError, match=r"validation_file '.*v\.csv': row 2 \(line 3\): label 'meh' is not a "
                                         r"label of train_file '.*t\.csv': labels must be one of \['neg', 'pos'\]"):
        load_files(sentiment(tmp_path / "t.csv"), sentiment(tmp_path / "v.csv", [("x", "pos"), ("y", "meh")]))


def test_validation_class_id_beyond_training(tmp_path):
    with pytest.raises(ValueError, match=r"validation_file '.*v\.jsonl': row 1 \(line 1\): label '2' is not a "
                                         r"label of train_file .*class ids 0\.\.1"):
        load_files(sentiment(tmp_path / "t.csv", [("x", 0), ("y", 1)]), sentiment(tmp_path / "v.jsonl", [("z", 2)]))


def test_more_than_two_text_columns(tmp_path):
    with pytest.raises(ValueError, match=r"text_columns takes one column \(a sentence\) or two \(a sentence "
                                         r"pair\), got 3"):
        load_files(sentiment(tmp_path / "t.csv"), text_columns=["a", "b", "c"])


def test_text_columns_includes_the_label(tmp_path):
    with pytest.raises(ValueError, match=r"text_columns \['text', 'label'\] includes the label_column 'label'"):
        load_files(sentiment(tmp_path / "t.csv"), text_columns=["text", "label"])


def test_bad_num_labels_argument(tmp_path):
    with pytest.raises(ValueError, match=r"num_labels must be an int >= 1 or None, got 0"):
        load_files(sentiment(tmp_path / "t.csv"), num_labels=0)


def test_ragged_csv_row(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nx,1\ny,0,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.csv': row 2 \(line 3\) has 3 cells, the header has 2"):
        load_files(tmp_path / "t.csv")


def test_invalid_json(tmp_path):
    (tmp_path / "t.json").write_text('[{"text": "x", "label": 1},\n {"text": }]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_file '.*t\.json': invalid JSON at line 2"):
        load_files(tmp_path / "t.json")


# ----------------------------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def tokenizer():
    from sft_kernels.split import load_minilm

    tok, _ = load_minilm()
    return tok


def test_batches_from_files(tmp_path, tokenizer):
    rows = [{"sentence1": f"sentence number {i}", "sentence2": "and its pair" * (i % 3 + 1), "label": ["b", "a"][i % 2]}
            for i in range(5)]
    spec, train, _ = load_files(write(tmp_path / "t.jsonl", rows))
    out = list(batches(tokenizer, train, 2, max_length=16, shuffle=True, seed=3))
    assert len(out) == 3
    for b in out:
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] <= 16 and b["labels"].dtype == torch.long
        assert int(b["token_type_ids"].max()) == 1  # the pair reached the tokenizer
    assert sorted(torch.cat([b["labels"] for b in out]).tolist()) == sorted(train["label"])

    spec, reg, _ = load_files(sentiment(tmp_path / "r.csv", [("x", 0.25), ("y", 3)]))
    (b,) = batches(tokenizer, reg, 4)
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [0.25, 3.0]
    assert int(b["token_type_ids"].max()) == 0
