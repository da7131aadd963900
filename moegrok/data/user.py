"""The user's own corpora: training documents and test items from local files.

Formats (chosen so that every error can name a file and a line):

- ``.jsonl`` documents: one JSON object per non-blank line with a non-empty string field ``text`` (other fields are
  ignored; the text may contain newlines).
- ``.txt`` (or any other suffix) documents: ``lines`` (default): every non-blank line is one document;
  ``paragraphs``: documents are runs of non-blank lines separated by blank lines, joined with ``\\n``.
- test items: JSONL, one object per non-blank line: ``{"id": str|int, "prompt": str, "answer": non-empty str}``,
  ids unique within the file.

Files must be UTF-8. Anything else raises :class:`MoegrokError` naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

from moegrok.errors import MoegrokError


@dataclasses.dataclass(frozen=True)
class TextDocs:
    """Documents of one file, in file order; ``lines[k]`` is the 1-based line where document k starts."""

    path: str
    texts: tuple[str, ...]
    lines: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    answer: str
    line: int


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its terminator); names the file/line on any read failure."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MoegrokError(f"{p}: no such file")
    if not p.is_file():
        raise MoegrokError(f"{p}: not a regular file")
    try:
        f = open(p, "rb")
    except OSError as e:
        raise MoegrokError(f"{p}: cannot read ({e.strerror or e})") from None
    with f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoegrokError(f"{p}:{i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            yield i, line.rstrip("\r\n")


def json_object(p: str, i: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoegrokError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise MoegrokError(f"{p}:{i}: expected a JSON object, got {type(obj).__name__}")
    return obj


def resolve_format(path: str, text_format: str) -> str:
    if text_format != "auto":
        return text_format
    return "jsonl" if Path(path).suffix.lower() == ".jsonl" else "lines"


def read_documents(path: str, text_format: str = "auto") -> TextDocs:
    """Documents of a ``.jsonl`` / ``.txt`` file (see module docstring for the formats)."""
    fmt = resolve_format(path, text_format)
    texts: list[str] = []
    starts: list[int] = []
    if fmt == "jsonl":
        for i, line in iter_lines(path):
            if not line.strip():
                continue
            obj = json_object(path, i, line)
            t = obj.get("text")
            if not isinstance(t, str):
                raise MoegrokError(f"{path}:{i}: field 'text' must be a string, got "
                                   f"{'nothing' if 'text' not in obj else type(t).__name__}")
            if not t.strip():
                raise MoegrokError(f"{path}:{i}: field 'text' is empty")
            texts.append(t)
            starts.append(i)
    elif fmt == "lines":
        for i, line in iter_lines(path):
            if line.strip():
                texts.append(line)
                starts.append(i)
    elif fmt == "paragraphs":
        cur: list[str] = []
        for i, line in iter_lines(path):
            if line.strip():
                if not cur:
                    starts.append(i)
                cur.append(line)
            elif cur:
                texts.append("\n".join(cur))
                cur = []
        if cur:
            texts.append("\n".join(cur))
    else:
        raise MoegrokError(f"{path}: unknown text_format {fmt!r}; allowed: auto, jsonl, lines, paragraphs")
    if not texts:
        raise MoegrokError(f"{path}: no documents (the file is empty or blank)")
    return TextDocs(str(path), tuple(texts), tuple(starts))


def read_test_items(path: str) -> list[EvalItem]:
    """Test items from JSONL ``{"id", "prompt", "answer"}``."""
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for i, line in iter_lines(path):
        if not line.strip():
            continue
        obj = json_object(path, i, line)
        missing = [k for k in ("id", "prompt", "answer") if k not in obj]
        if missing:
            raise MoegrokError(f"{path}:{i}: missing field(s) {missing}; expected {{\"id\", \"prompt\", \"answer\"}}")
        tid = obj["id"]
        if isinstance(tid, bool) or not isinstance(tid, (str, int)):
            raise MoegrokError(f"{path}:{i}: field 'id' must be a string or integer, got {tid!r}")
        tid = str(tid)
        if tid in seen:
            raise MoegrokError(f"{path}:{i}: id {tid!r} already used on line {seen[tid]}")
        seen[tid] = i
        if not isinstance(obj["prompt"], str):
            raise MoegrokError(f"{path}:{i}: field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
        if not isinstance(obj["answer"], str) or not obj["answer"]:
            raise MoegrokError(f"{path}:{i}: field 'answer' must be a non-empty string, got {obj['answer']!r}")
        items.append(EvalItem(tid, obj["prompt"], obj["answer"], i))
    if not items:
        raise MoegrokError(f"{path}: no test items (the file is empty or blank)")
    return items
