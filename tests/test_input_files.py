"""Local input files: ``data.local_file.encoding`` (a codec or ``auto``), the ``jsonl`` and
``text`` sources, and files that do not decode failing in data_processing — naming the file, the
byte offset and the option to set — before any training."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import typed_params
from tests.test_session import copy_project, kedro_run
from weighted_lowrank.hf.text_files import read_text
from weighted_lowrank.kedro_glue.parameters import DataParams, ParameterError
from weighted_lowrank.pipelines.data_processing.nodes import (
    clean_records,
    encode_labels,
    load_source_records,
    resolve_source,
)

#: Texts a French/Spanish/German spreadsheet holds, three classes; none is ASCII-only.
TWEETS = [
    ("Très bon café à Málaga, déjà fini!", "positive"),
    ("Mañana será mejor, qué pena…", "negative"),
    ("Schöne Grüße aus München", "neutral"),
    ("Ça ne vaut pas l'œuvre originale", "negative"),
    ("Niño feliz en la playa", "positive"),
    ("Bof, ni bien ni mal, à voir", "neutral"),
]
#: The same texts in Latin-1 (which lacks … and œ: they become ... and oe).
LATIN1_TWEETS = [(text.replace("…", "...").replace("œ", "oe"), label) for text, label in TWEETS]


def _params(**local_file) -> DataParams:
    source = local_file.pop("source", "csv")
    return typed_params("data", source=source, local_file=local_file)


def _write_csv(path: Path, rows: list[tuple[str, str]], encoding: str) -> Path:
    frame = pd.DataFrame(rows, columns=["text", "label"])
    path.write_bytes(frame.to_csv(index=False).encode(encoding))
    return path


def _records(params: DataParams, model_task: str = "sequence_classification") -> pd.DataFrame:
    source = resolve_source(params, typed_params("model", task=model_task))
    return load_source_records(None, source)


def test_a_latin1_csv_reads_intact_with_its_encoding(tmp_path):
    path = _write_csv(tmp_path / "tweets.csv", LATIN1_TWEETS, "latin-1")
    params = _params(path=str(path), encoding="latin-1")
    source = resolve_source(params, typed_params("model", task="sequence_classification"))
    assert source["encoding"] == "latin-1"
    records = load_source_records(None, source)
    assert records["text"].tolist() == [text for text, _ in LATIN1_TWEETS]
    encoded, names = encode_labels(clean_records(records, source), source)
    assert names == ["negative", "neutral", "positive"] and len(encoded) == 6
    # A compressed export decodes the same way.
    packed = tmp_path / "tweets.csv.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    packed_records = _records(_params(path=str(packed), encoding="latin-1"))
    assert packed_records["text"].tolist() == records["text"].tolist()


def test_a_latin1_csv_read_as_utf8_fails_naming_file_offset_and_option(tmp_path):
    path = _write_csv(tmp_path / "tweets.csv", LATIN1_TWEETS, "latin-1")
    offset = path.read_bytes().index("è".encode("latin-1"))
    with pytest.raises(ValueError) as raised:
        _records(_params(path=str(path)))  # the default: utf-8
    error = raised.value
    assert type(error) is ValueError, "not a raw UnicodeDecodeError"
    message = str(error)
    assert str(path) in message and "as utf-8" in message
    assert f"byte offset {offset} (line 2, column 4)" in message
    assert r"b'\xe8'" in message and "Tr" in message  # the byte and its context
    assert "--params data.local_file.encoding=latin-1" in message
    assert "data.local_file.encoding=auto" in message


@pytest.mark.parametrize(
    ("data", "expected", "text"),
    [
        ("Très bon café".encode(), "utf-8", "Très bon café"),
        (b"\xef\xbb\xbftext\nTr\xc3\xa8s", "utf-8-sig", "text\nTrès"),
        ("text\nTrès".encode("utf-16"), "utf-16", "text\nTrès"),
        ("Très bon café".encode("latin-1"), "cp1252", "Très bon café"),
        ("l’été".encode("cp1252"), "cp1252", "l’été"),
        # 0x81 has no cp1252 character: only Latin-1 decodes it.
        (b"caf\xe9 \x81", "latin-1", "café \x81"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-bom", "latin-1-text", "cp1252-quote", "latin-1-only"],
)
def test_auto_picks_utf8_when_it_decodes_else_a_single_byte_codec(tmp_path, data, expected, text):
    path = tmp_path / "file.txt"
    path.write_bytes(data)
    assert read_text(path, "auto") == (text, expected)


def test_auto_logs_the_single_byte_choice_and_reads_the_csv(tmp_path, caplog):
    path = _write_csv(tmp_path / "tweets.csv", LATIN1_TWEETS, "latin-1")
    with caplog.at_level(logging.INFO, logger="weighted_lowrank.hf.text_files"):
        records = _records(_params(path=str(path), encoding="auto"))
    assert records["text"].tolist() == [text for text, _ in LATIN1_TWEETS]
    assert "is not UTF-8" in caplog.text and "decoding it as cp1252" in caplog.text
    utf8 = _write_csv(tmp_path / "utf8.csv", TWEETS, "utf-8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="weighted_lowrank.hf.text_files"):
        assert _records(_params(path=str(utf8), encoding="auto"))["text"].tolist() == [
            text for text, _ in TWEETS
        ]
    assert "decodes as utf-8" in caplog.text


def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "text,label\nà,a\nb,b\n".encode())
    assert _records(_params(path=str(path)))["text"].tolist() == ["à", "b"]


@pytest.mark.parametrize(
    ("local_file", "message"),
    [
        (
            {"encoding": "klingon"},
            r"data\.local_file\.encoding='klingon': expected auto or a Python text codec",
        ),
        ({"encoding": ""}, r"data\.local_file\.encoding=''"),
        ({"encoding": "base64"}, r"data\.local_file\.encoding='base64'"),
        ({"read_args": {"encoding": "latin-1"}}, r"read_args.*set data\.local_file\.encoding"),
        ({"source": "jsonl"}, r"path to be set when data\.source is 'jsonl'"),
        ({"source": "text"}, r"path to be set when data\.source is 'text'"),
        (
            {"source": "jsonl", "path": "x.jsonl", "read_args": {"sep": ";"}},
            r"no data\.local_file\.read_args \['sep'\] when data\.source is 'jsonl'",
        ),
    ],
)
def test_bad_file_options_fail_when_parameters_are_parsed(local_file, message):
    with pytest.raises(ParameterError, match=message):
        _params(**local_file)


def test_codec_aliases_are_accepted():
    for name in ("latin-1", "ISO-8859-1", "cp1252", "utf_16", "auto"):
        assert _params(path="x.csv", encoding=name).local_file.encoding == name


def test_jsonl_source_reads_one_object_per_line_with_the_column_options(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"premise": "Il pleut à Paris", "hypothesis": "Le temps est sec", "gold": "contradiction"},
        {"premise": "Él corre", "hypothesis": "Alguien se mueve", "gold": "entailment", "id": 7},
    ]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_bytes(("\n".join([lines[0], "", lines[1]]) + "\n").encode("latin-1"))
    params = _params(
        source="jsonl",
        path=str(path),
        encoding="latin-1",
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="gold",
    )
    records = _records(params)
    assert records.columns.tolist() == ["text", "text_pair", "label"]
    assert records["text"].tolist() == ["Il pleut à Paris", "Él corre"]
    assert records["label"].tolist() == ["contradiction", "entailment"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"line 2 is not valid JSON"),
        ('{"text": "a", "label": 1}\n["b", 0]\n', r"line 2 holds a list, not a JSON object"),
    ],
)
def test_a_bad_jsonl_line_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"bad\.jsonl' {message}"):
        _records(_params(source="jsonl", path=str(path)))


def test_an_undecodable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "tweets.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(ValueError, match=r"tweets\.jsonl' as utf-8: byte offset 40 \(line 2, col"):
        _records(_params(source="jsonl", path=str(path)))


def test_text_source_is_one_document_per_non_empty_line_for_a_language_model(tmp_path):
    path = tmp_path / "corpus.txt"
    # Lines end at \n (or \r\n) only: a form feed inside a line does not split it.
    path.write_bytes("Première ligne.\r\n\n   \nDeuxième\x0c— suite\n".encode("cp1252"))
    params = _params(source="text", path=str(path), encoding="cp1252")
    source = resolve_source(params, typed_params("model", task="causal_lm"))
    assert source["label_column"] is None and source["text_column"] == "text"
    assert source["encoding"] == "cp1252"
    records = load_source_records(None, source)
    assert records["text"].tolist() == ["Première ligne.", "Deuxième\x0c— suite"]


def test_text_source_is_refused_for_a_classification_model(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"data\.source=text is a corpus without labels"):
        resolve_source(
            _params(source="text", path=str(path)),
            typed_params("model", task="sequence_classification"),
        )


def test_parquet_ignores_the_encoding(tmp_path):
    path = tmp_path / "tweets.parquet"
    pd.DataFrame(TWEETS, columns=["text", "label"]).to_parquet(path)
    records = _records(_params(source="parquet", path=str(path), encoding="latin-1"))
    assert records["text"].tolist() == [text for text, _ in TWEETS]


# ------------------------------------------------------------------------ a real `kedro run`


def _kedro_run(project: Path, model_dir: Path, local_file: dict, pipeline: str) -> None:
    kedro_run(
        project,
        pipeline,
        {
            "mlflow_tracking_uri": f"sqlite:///{project / 'mlflow.db'}",
            "model": {"source": str(model_dir)},
            "data": {"source": "csv", "local_file": local_file},
        },
    )


def test_a_kedro_run_on_a_latin1_csv_fails_in_data_processing_before_fine_tuning(tmp_path):
    model_dir = copy_project(tmp_path)
    many = [(f"{text} n°{i}", label) for i in range(40) for text, label in LATIN1_TWEETS]
    path = _write_csv(tmp_path / "tweets.csv", many, "latin-1")

    with pytest.raises(ValueError) as raised:
        _kedro_run(tmp_path, model_dir, {"path": str(path)}, "__default__")
    assert type(raised.value) is ValueError
    assert str(path) in str(raised.value) and "byte offset" in str(raised.value)
    assert "--params data.local_file.encoding=latin-1" in str(raised.value)
    assert not (tmp_path / "data" / "06_models").exists(), "no fine-tuned model was written"
    assert not (tmp_path / "data" / "03_primary").exists(), "no split was written"

    # With the encoding set, the same file makes the splits, accents intact.
    _kedro_run(tmp_path, model_dir, {"path": str(path), "encoding": "latin-1"}, "data_processing")
    train = pd.read_parquet(tmp_path / "data" / "03_primary" / "train_split.parquet")
    assert train["text"].str.contains("é").any() and train["text"].str.contains("ñ").any()
