"""What tests/test_docs.py checks the documentation with: the pages, their fenced blocks and shell commands, a
link checker with GitHub's anchor rules, and the configuration reference generated from the config dataclasses.

`python tests/docs_check.py` rewrites the reference in docs/training.md from the code."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TRAINING = ROOT / "docs" / "training.md"
REFERENCE_BEGIN, REFERENCE_END = "<!-- config-reference: begin -->", "<!-- config-reference: end -->"

# The trainings' size in tests: 12 steps, 3 checkpoints (4, 8, 12), one layer, few documents: seconds, not minutes.
SHRINK = ("data.num_steps=12 train.num_checkpoints=3 train.log_every=4 data.val_docs=8 data.probe_docs=4 "
          "model.num_hidden_layers=1")

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(text: str, lang: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag == lang]


def shell_commands(block: str) -> list[str]:
    """The block's commands in order: lines joined until bash reads a complete command (continuations, quotes
    spanning lines and `for ... done` included); whole-line comments dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if not pending.rstrip().endswith("\\") and _complete(pending):
            out.append(pending.rstrip())
            pending = ""
    if pending:
        raise ValueError(f"incomplete shell command: {pending!r}")
    return out


def _complete(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True).returncode == 0


def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """The environment for moegrok subprocesses: this interpreter's scripts first, no device-count flags inherited
    from the test process, and one XLA compilation cache for the session (the same programs compile once)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax-compilation-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


# ---------------------------------------------------------------------------------------------------------------
# Links

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+).*?\1", re.S)


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where nothing is a link."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _FENCE.sub("", text), flags=re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(text: str, page: Path) -> list[str]:
    """Every relative link or #anchor in `text` (a page at `page`) that does not resolve, one line each."""
    errors = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve()
        if path and not dest.exists():
            errors.append(f"{page.name}: link {target!r}: {path} does not exist")
            continue
        if anchor and (not path or dest.suffix == ".md"):
            heads = anchors(dest.read_text(encoding="utf-8") if path else text)
            if anchor not in heads:
                errors.append(f"{page.name}: link {target!r}: no heading with anchor #{anchor} in "
                              f"{dest.name if path else page.name}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# The configuration reference

def _sections():
    from moegrok.analysis.run_metrics import AnalysisConfig
    from moegrok.data.config import DataConfig, DomainConfig
    from moegrok.model.config import MoeConfig
    from moegrok.theory.fromrun import RunTheoryConfig
    from moegrok.training.config import TrainConfig

    return [("model", MoeConfig), ("data", DataConfig), ("data.domains.NAME", DomainConfig), ("train", TrainConfig),
            ("analysis", AnalysisConfig), ("theory", RunTheoryConfig)]


def field_comments(cls) -> dict[str, str]:
    """Each field's meaning as its source gives it: the comment block right above the field, then the comment on
    its line, else its entry in the class docstring's `Attributes:`."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments = {tok.start[0]: tok.string.lstrip("#").strip(" -")
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    code_lines = source.splitlines()
    documented = _docstring_attributes(inspect.getdoc(cls) or "")
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and code_lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        inline = comments.get(node.lineno, "")
        if above and inline:
            inline = inline[0].upper() + inline[1:]
        out[node.target.id] = " ".join([*above, inline]).strip() or documented.get(node.target.id, "")
    return out


def _docstring_attributes(doc: str) -> dict[str, str]:
    out, names = {}, []
    block = doc.partition("Attributes:")[2]
    for line in block.splitlines():
        m = re.match(r"    (\w+(?:, \w+)*): (.*)", line)
        if m:
            names = m.group(1).split(", ")
            for n in names:
                out[n] = m.group(2)
        elif line.startswith("        ") and names:
            for n in names:
                out[n] += " " + line.strip()
    return out


def _annotation(cls, name: str) -> str:
    """The type as the source writes it (the config modules keep annotations as strings)."""
    hint = cls.__annotations__[name]
    return hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return _yaml(value)


def _yaml(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        if value and all(dataclasses.is_dataclass(v) for v in value):
            return ", ".join(f"`{v.name}`" for v in value)
        return f"`{list(value)}`"
    return f"`{value}`"


def config_reference() -> str:
    """The reference tables: one per config section, one row per key (type, default, meaning)."""
    parts = []
    for section, cls in _sections():
        meanings = field_comments(cls)
        parts += [f"### `{section}` ({cls.__name__})", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = meanings.get(f.name, "").replace("|", "\\|") or "—"
            kind = _annotation(cls, f.name).replace("|", "\\|")
            parts.append(f"| `{section}.{f.name}` | `{kind}` | {_default(f)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


def reference_in_page(page_text: str) -> str:
    return page_text.split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0].strip("\n")


def write_reference(page: Path = TRAINING) -> None:
    text = page.read_text(encoding="utf-8")
    head, rest = text.split(REFERENCE_BEGIN, 1)
    tail = rest.split(REFERENCE_END, 1)[1]
    page.write_text(f"{head}{REFERENCE_BEGIN}\n{config_reference()}\n{REFERENCE_END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    write_reference()
    print(f"wrote the configuration reference into {rel(TRAINING)}", file=sys.stderr)
