"""Turn input files into documents (strings): plain text, jsonl records, csv rows."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flexmoe.data.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
# Cells can be whole articles; the csv module's 128 KiB default would reject them.
_CSV_FIELD_LIMIT = 1 << 30


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Resolve inputs to a list of files: directories expand to their files (sorted, recursive,
    hidden names skipped) so the result, and hence the token order, is deterministic."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: input directory holds no files; remove it from the inputs")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: input file does not exist; fix the path in the inputs")
    if not files:
        raise DataError("inputs: no input files given; pass at least one text, jsonl or csv file")
    return files


def iter_documents(
    path: str | Path,
    *,
    text_field: str = "text",
    csv_fields: list[str] | None = None,
    csv_newline_escape: str | None = "\\n",
) -> Iterator[str]:
    """Yield the documents in one file; empty or whitespace-only documents are skipped.

    .jsonl/.ndjson: one record per line; .csv/.tsv: one row per document, with every
    `csv_newline_escape` (default: the two characters backslash + n; None: off) turned into a
    line break; .json is refused (convert it to jsonl); anything else is UTF-8 text holding a
    single document.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        docs: Iterable[str] = _jsonl_documents(path, text_field)
    elif suffix in CSV_DELIMITERS:
        docs = _csv_documents(path, csv_fields, CSV_DELIMITERS[suffix], csv_newline_escape)
    elif suffix == ".json":
        raise DataError(f"{path}: .json files are not read as data; convert it to .jsonl (one record per line)")
    else:
        docs = [_read_text(path)]
    for doc in docs:
        if doc.strip():
            yield doc


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise become tokens.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or drop it from the inputs") from e


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of each non-blank line."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e}); fix or remove the line") from e
                yield lineno, record
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text; convert it to UTF-8 or drop it from the inputs") from e


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in _jsonl_records(path):
        yield record_text(record, text_field, f"{path}:{lineno}")


def iter_user_documents(path: str | Path, *, text_field: str = "text", user_field: str) -> Iterator[tuple[str, str]]:
    """Yield (document, user key) for each document of one jsonl file, skipping empty documents
    as `iter_documents` does, so the two yield the same documents in the same order.

    Every record, empty or not, must carry `user_field` as a string or an integer (a record
    without one is refused, naming the file, the record number and its line). The key is the
    value as text: a user written once as 7 and once as "7" is one user, which errs towards
    larger units (a merged unit still protects each person in it; a split one would not).
    """
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{path}: --user-field reads a field of jsonl records, and this is not a "
                        f"{'/'.join(sorted(JSONL_SUFFIXES))} file; convert it to jsonl with the user id in each record")
    for number, (lineno, record) in enumerate(_jsonl_records(path), start=1):
        where = f"{path}:{lineno}"
        text = record_text(record, text_field, where)  # refuses a record that is no JSON object
        if user_field not in record:
            raise DataError(f"{where}: record {number} has no user field {user_field!r}; add it to every record, "
                            "or drop --user-field")
        value = record[user_field]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":  # bool: an int, no id
            raise DataError(f"{where}: record {number}: user field {user_field!r} is {json.dumps(value)[:40]}, not a "
                            "non-empty string or an integer; fix the record")
        if text.strip():
            yield text, str(value)


def record_text(record: Any, text_field: str, where: str) -> str:
    """The document text of one jsonl record: `text_field`, else question + answer, else
    chat `messages` as "role: content" lines. `where` names the record in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; write one object per line")
    value = record.get(text_field)
    if isinstance(value, str):
        return value
    if value is not None:
        raise DataError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string; set text_field to a text field")
    question, answer = record.get("question"), record.get("answer")
    if isinstance(question, str) and isinstance(answer, str):
        return question + "\n" + answer
    messages = record.get("messages")
    if isinstance(messages, list):
        lines = []
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: each entry of 'messages' needs string 'role' and 'content'; fix the record")
            lines.append(f"{m['role']}: {m['content']}")
        return "\n".join(lines)
    raise DataError(
        f"{where}: no {text_field!r} field (nor question/answer or messages); set text_field to the field holding the text"
    )


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _is_number(cell: str) -> bool:
    # A regex, not float(): float() also accepts words such as "nan" and "Infinity".
    return _NUMBER.fullmatch(cell.strip()) is not None


def _csv_documents(
    path: Path, csv_fields: list[str] | None, delimiter: str, newline_escape: str | None
) -> Iterator[str]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)

    def unescape(text: str) -> str:
        # Dumps such as AG News write line breaks inside cells as an escape sequence.
        return text.replace(newline_escape, "\n") if newline_escape else text

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            sample = f.read(1 << 16)
            f.seek(0)
            rows = csv.reader(f, delimiter=delimiter)
            if csv_fields:
                header = next(rows, [])
                missing = [name for name in csv_fields if name not in header]
                if missing:
                    raise DataError(f"{path}: csv_fields {missing} not in the header {header}; fix csv_fields")
                columns = [header.index(name) for name in csv_fields]
                for row in rows:
                    yield unescape("\n".join(row[c] for c in columns if c < len(row) and row[c]))
                return
            if _has_header(sample, delimiter):
                next(rows, None)
            for row in rows:
                # Without named fields, numeric cells (ids, class labels) are metadata, not text.
                yield unescape("\n".join(c for c in row if c.strip() and not _is_number(c)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text; convert it to UTF-8 or drop it from the inputs") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed csv ({e}); fix the file or convert it to jsonl") from e


def _has_header(sample: str, delimiter: str) -> bool:
    # The Sniffer guesses from a few rows and calls short headerless files headed; a numeric
    # cell (a class label, an id) in the first row is the surer sign that it is data.
    try:
        first = next(csv.reader(io.StringIO(sample), delimiter=delimiter), [])
    except csv.Error:
        return False
    if any(_is_number(cell) for cell in first):
        return False
    try:
        return csv.Sniffer().has_header(sample)
    except csv.Error:
        return False  # too little or too uniform text to tell: treat every row as data
