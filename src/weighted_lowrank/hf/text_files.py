"""Local text files (CSV/TSV, JSON Lines, plain text) decoded with a named encoding.

A file that does not decode fails before any training, naming the file, the byte offset, the
encoding tried and the parameter to set. ``auto`` decodes UTF-8 (or what a byte-order mark says),
else Windows-1252, then Latin-1: the rule browsers apply to undeclared Western text (WHATWG). A
statistical detector (``charset_normalizer``) was rejected: on short Western-European texts it
picks cp1250 and turns "Mañana" into "Mańana".
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path
from typing import Any

import fsspec

#: The parameter that sets the encoding (named in every decoding error).
ENCODING_KEY = "data.local_file.encoding"
AUTO = "auto"
#: Tried in order by ``auto`` when a file is not UTF-8; Latin-1 decodes every byte.
SINGLE_BYTE_FALLBACKS = ("cp1252", "latin-1")
#: Byte-order marks ``auto`` trusts, longest first (UTF-32-LE's starts with UTF-16-LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
#: pandas' ``compression`` values that fsspec opens under the same name.
_COMPRESSIONS = ("infer", None, "gzip", "bz2", "xz", "zip", "zstd")
_CONTEXT_BYTES = 16

logger = logging.getLogger(__name__)


def read_text(path: str | Path, encoding: str, compression: Any = "infer") -> tuple[str, str]:
    """The text of ``path`` and the encoding it was decoded with (``auto`` resolved);
    ``compression`` takes pandas' values (:data:`_COMPRESSIONS` or ``{"method": …}``). UTF-8
    ignores a leading byte-order mark, as pandas does."""
    data = read_bytes(path, compression)
    chosen = detect_encoding(data, path) if encoding == AUTO else encoding
    if codecs.lookup(chosen).name == "utf-8":
        chosen = "utf-8-sig" if data.startswith(codecs.BOM_UTF8) else chosen
    try:
        return data.decode(chosen), chosen
    except UnicodeDecodeError as error:
        raise undecodable(path, data, error, chosen) from None


def read_bytes(path: str | Path, compression: Any = "infer") -> bytes:
    """The bytes of ``path``, decompressed (``compression`` as for :func:`read_text`)."""
    method = compression.get("method") if isinstance(compression, dict) else compression
    if method not in _COMPRESSIONS:
        raise ValueError(
            f"data.local_file.read_args.compression={compression!r} is not supported for text "
            f"files; expected one of {[name for name in _COMPRESSIONS if name]} or null"
        )
    with fsspec.open(str(path), "rb", compression=method) as handle:
        return handle.read()


def detect_encoding(data: bytes, path: str | Path = "<bytes>") -> str:
    """``auto``: the byte-order mark's encoding, else UTF-8 if the bytes are UTF-8, else the first
    of :data:`SINGLE_BYTE_FALLBACKS` that decodes them (logged, with how to override it)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            logger.info(
                "%s=auto: %s starts with a %s byte-order mark", ENCODING_KEY, path, encoding
            )
            return encoding
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        first_bad = error.start
    else:
        logger.info("%s=auto: %s decodes as utf-8", ENCODING_KEY, path)
        return "utf-8"
    for encoding in SINGLE_BYTE_FALLBACKS:
        try:
            data.decode(encoding)
        except UnicodeDecodeError:
            continue
        line, column = _line_and_column(data, first_bad)
        logger.warning(
            "%s=auto: %s is not UTF-8 (byte 0x%02x at line %d, column %d); decoding it as %s. "
            "If its accented characters look wrong, set %s to the file's encoding",
            ENCODING_KEY,
            path,
            data[first_bad],
            line,
            column,
            encoding,
            ENCODING_KEY,
        )
        return encoding
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def undecodable(
    path: str | Path, data: bytes, error: UnicodeDecodeError, encoding: str
) -> ValueError:
    """The error for a file that ``encoding`` cannot decode: where, what, and the option to set."""
    offset = error.start
    line, column = _line_and_column(data, offset)
    before = data[max(0, offset - _CONTEXT_BYTES) : offset]
    after = data[offset : offset + _CONTEXT_BYTES]
    return ValueError(
        f"cannot decode {str(path)!r} as {encoding}: byte offset {offset} (line {line}, column "
        f"{column}) holds {data[offset : error.end]!r} ({error.reason}); the bytes around it are "
        f"{before!r} + {after!r}. The file is in another encoding: set {ENCODING_KEY} (conf/local/"
        f"parameters_data_processing.yml, or --params {ENCODING_KEY}=latin-1 for a file from a "
        f"Western-European spreadsheet, cp1252, …) or {ENCODING_KEY}=auto to detect it"
    )


def _line_and_column(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def jsonl_records(text: str, path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; a line that is not one fails naming file and line."""
    records = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{str(path)!r} line {number} is not valid JSON ({error.msg} at column "
                f"{error.colno}): {line[:80]!r}; data.source=jsonl expects one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{str(path)!r} line {number} holds a {type(record).__name__}, not a JSON object: "
                f"{line[:80]!r}; data.source=jsonl expects one object per line"
            )
        records.append(record)
    return records


def text_lines(text: str) -> list[str]:
    """The documents of a plain text file: its non-empty lines, without line terminators."""
    return [line for line in _lines(text) if line.strip()]


def _lines(text: str) -> list[str]:
    # Not str.splitlines: it also splits at U+2028, U+0085 and form feeds, which JSON strings and
    # prose may hold.
    return [line.removesuffix("\r") for line in text.split("\n")]
