"""Data configuration: what the corpus is made of, how it is mixed, and how big every piece is.

Two frozen dataclasses. :class:`DomainConfig` describes one domain (a synthetic task, its rule-free twin, or the
user's own files); :class:`DataConfig` describes the whole one-epoch corpus. Both are built from plain dicts (YAML)
with :meth:`DataConfig.from_dict`, which names any bad field and what it accepts in a :class:`MoegrokError`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moegrok.config_values import check_fields
from moegrok.errors import MoegrokError

SYNTHETIC_KINDS = ("math", "knowledge", "code", "retrieval")
KINDS = SYNTHETIC_KINDS + ("text",)
TEXT_FORMATS = ("auto", "jsonl", "lines", "paragraphs")

# Difficulty knobs: field -> (kinds it applies to, default when left None). A knob set on a domain of another kind
# is an error rather than silently ignored, so a typo in a study config cannot go unnoticed.
KNOB_DEFAULTS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "modulus": (("math", "code"), {"math": 47, "code": 7}),
    "operation": (("math",), {"math": "add"}),
    "entities": (("knowledge",), {"knowledge": 20}),
    "relations": (("knowledge",), {"knowledge": 10}),
    "program_len": (("code",), {"code": 2}),
    "items": (("retrieval",), {"retrieval": 100}),
    "categories": (("retrieval",), {"retrieval": 10}),
    "fields": (("retrieval",), {"retrieval": 5}),
    "values": (("retrieval",), {"retrieval": 10}),
    # Held-out share of the *composite* facts (math: all pairs). Math 0.5 and knowledge 0.15 are the settings of the
    # throwaway prototype that preceded this project (docs/findings.md); code and retrieval have no measurement yet.
    "heldout_frac": (SYNTHETIC_KINDS, {"math": 0.5, "knowledge": 0.15, "code": 0.2, "retrieval": 0.3}),
}
TEXT_ONLY = ("train_path", "test_path")
MATH_OPERATIONS = ("add", "sub")


@dataclasses.dataclass(frozen=True)
class DomainConfig:
    """One domain of the mixture.

    Attributes:
        name: label used in batches, probe records and reports (unique within a corpus).
        kind: ``math`` | ``knowledge`` | ``code`` | ``retrieval`` (synthetic, generated here) or ``text`` (the
            user's files). If omitted: the name itself when it is a kind, or ``<kind>_twin`` -> that kind with
            ``twin=True``.
        docs_per_step: documents of this domain in every batch (the mixture weight; batch size = sum over domains).
        twin: synthetic kinds only. The rule-free twin: same statement formats and sizes, its own marker tokens
            (so no prompt equals one of the real domain), but every composite answer is drawn at random per fact,
            so held-out items cannot be inferred (accuracy stays at chance). A control that memorizes but cannot
            generalize; can be mixed with the real domain or run alone.
        heldout_frac: share of the composite facts kept out of training (math: operand pairs; knowledge: two-hop
            facts; code: longest programs; retrieval: item-attribute queries). Default per kind: math 0.5,
            knowledge 0.15, code 0.2, retrieval 0.3.
        test_items: at most this many held-out facts become test items (a fixed seeded subset).
        modulus: math: ``a + b = c`` modulo this (default 47); code: values are taken modulo this (default 7).
        operation: math: ``add`` (``a + b = c``, the default) or ``sub`` (``a - b = c``, c = a - b mod p), so a
            study can hold two rule domains of the same kind side by side (each with its own operator token).
        entities, relations: knowledge: a random map ``entity x relation -> entity`` (defaults 20, 10). Atomic
            facts ``e r = e'`` are all trained; two-hop facts ``e r1 r2 = e''`` are the composites.
        program_len: code: programs ``v op n [op n ...] -> r`` of 1..program_len operations (add, mul), evaluated
            left to right modulo ``modulus`` (default 2). Shorter programs are all trained; the held-out ones are
            unseen programs of full length.
        items, categories, fields, values: retrieval: every item belongs to a category (``i in c``), every category
            has a value per field (``c f : v``); the composites are item queries ``i f : v`` answered through the
            item's category (defaults 100, 10, 5, 10).
        train_path: text only: the documents, one file. ``.jsonl``: one JSON object per line with a non-empty
            string field ``text``. ``.txt`` (any other suffix): one document per non-blank line, or with
            ``text_format: paragraphs`` documents separated by blank lines.
        test_path: text only, optional: test items as JSONL ``{"id", "prompt", "answer"}``; the model is scored on
            ``answer`` following ``prompt`` (each encoded on its own, so put a separating space where the
            tokenizer needs one, e.g. at the start of ``answer``).
        text_format: text only: ``auto`` (by suffix: ``.jsonl`` -> jsonl, else lines), ``jsonl``, ``lines``,
            ``paragraphs``.
    """

    name: str
    kind: str | None = None
    docs_per_step: int = 16
    twin: bool | None = None
    heldout_frac: float | None = None
    test_items: int = 400
    modulus: int | None = None
    operation: str | None = None
    entities: int | None = None
    relations: int | None = None
    program_len: int | None = None
    items: int | None = None
    categories: int | None = None
    fields: int | None = None
    values: int | None = None
    train_path: str | None = None
    test_path: str | None = None
    text_format: str = "auto"

    def __post_init__(self):
        where = f"data config: domain '{self.name}'"
        if not isinstance(self.name, str) or not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise MoegrokError(f"data config: domain name {self.name!r} must be a non-empty string of letters, "
                               "digits, '_' or '-'")
        check_fields(self, f"data.domains.{self.name}")
        kind, twin = self.kind, self.twin
        if kind is None:
            if self.name in KINDS:
                kind = self.name
            elif self.name.endswith("_twin") and self.name[:-5] in SYNTHETIC_KINDS:
                kind, twin = self.name[:-5], True if twin is None else twin
            else:
                raise MoegrokError(f"{where}: field 'kind' is required (one of {list(KINDS)}) unless the name is a "
                                   f"kind or '<kind>_twin'")
        if kind not in KINDS:
            raise MoegrokError(f"{where}: field 'kind' must be one of {list(KINDS)}, got {kind!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "twin", bool(twin))
        _check_int(where, "docs_per_step", self.docs_per_step, 1)
        _check_int(where, "test_items", self.test_items, 1)
        if self.twin and kind == "text":
            raise MoegrokError(f"{where}: field 'twin' applies to synthetic kinds {list(SYNTHETIC_KINDS)}, "
                               "not 'text'")
        for knob, (kinds, defaults) in KNOB_DEFAULTS.items():
            v = getattr(self, knob)
            if v is None:
                object.__setattr__(self, knob, defaults.get(kind))
            elif kind not in kinds:
                raise MoegrokError(f"{where}: field '{knob}' applies to kinds {list(kinds)}, not '{kind}'")
        for f in TEXT_ONLY:
            if getattr(self, f) is not None and kind != "text":
                raise MoegrokError(f"{where}: field '{f}' applies to kind 'text' only, not '{kind}'")
        if self.text_format not in TEXT_FORMATS:
            raise MoegrokError(f"{where}: field 'text_format' must be one of {list(TEXT_FORMATS)}, "
                               f"got {self.text_format!r}")
        if kind == "text":
            if not isinstance(self.train_path, str) or not self.train_path:
                raise MoegrokError(f"{where}: field 'train_path' is required for kind 'text' (a .jsonl or .txt file)")
            return
        h = self.heldout_frac
        if not 0.0 < h < 1.0:
            raise MoegrokError(f"{where}: field 'heldout_frac' must be a number in (0, 1), got {h!r}")
        if kind == "math" and self.operation not in MATH_OPERATIONS:
            raise MoegrokError(f"{where}: field 'operation' must be one of {list(MATH_OPERATIONS)}, "
                               f"got {self.operation!r}")
        mins = {"modulus": 2, "entities": 2, "relations": 1, "program_len": 1, "items": 2, "categories": 1,
                "fields": 1, "values": 2}
        for knob, lo in mins.items():
            if getattr(self, knob) is not None:
                _check_int(where, knob, getattr(self, knob), lo)


def _check_int(where: str, field: str, v: int, lo: int) -> None:
    if v < lo:
        raise MoegrokError(f"{where}: field '{field}' must be an integer >= {lo}, got {v!r}")


def default_domains() -> tuple[DomainConfig, ...]:
    """The prototype's setting that grokked on this CPU: 16 math + 16 knowledge documents per step."""
    return (DomainConfig("math", docs_per_step=16), DomainConfig("knowledge", docs_per_step=16))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The one-epoch corpus.

    Attributes:
        domains: the mixture, in order (domain id = position). Batch size = sum of ``docs_per_step``.
        num_steps: optimizer steps in the epoch; every step takes ``docs_per_step`` fresh documents of each
            domain, so a synthetic domain generates ``num_steps * docs_per_step`` unique training documents.
            ``None``: as many steps as the smallest text domain supplies (an error without text domains).
        statements_per_doc: statements per synthetic document (document = BOS + statements, no EOS).
        seq_len: tokens per row, BOS included (the model sees ``seq_len - 1`` inputs when predicting the next
            token). ``None``: the longest document of the corpus (math/knowledge with 8 statements: 49).
            Longer text documents are truncated.
        val_docs: validation documents per domain (same distribution as training, never trained on).
        probe_docs: probe documents per domain: training documents spread evenly over the epoch whose loss and
            routing the trainer records at every checkpoint.
        seed: everything (facts, held-out split, documents, order) is a pure function of this and the rest.
        tokenizer: ``None``: the built-in vocabulary (one token per synthetic symbol, plus 256 byte tokens when a
            text domain is present). Otherwise a local Hugging Face tokenizer directory (never a hub name).
    """

    domains: tuple[DomainConfig, ...] = dataclasses.field(default_factory=default_domains)
    num_steps: int | None = 7500
    statements_per_doc: int = 8
    seq_len: int | None = None
    val_docs: int = 256
    probe_docs: int = 128
    seed: int = 0
    tokenizer: str | None = None

    def __post_init__(self):
        check_fields(self, "data")
        doms = tuple(self.domains)
        object.__setattr__(self, "domains", doms)
        if not doms:
            raise MoegrokError("data config: field 'domains' must list at least one domain")
        for d in doms:
            if not isinstance(d, DomainConfig):
                raise MoegrokError(f"data config: field 'domains' must hold DomainConfig entries, got {type(d)}")
        names = [d.name for d in doms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MoegrokError(f"data config: domain names must be unique, repeated: {dup}")
        if self.num_steps is not None:
            _check_int("data config", "num_steps", self.num_steps, 1)
        elif not any(d.kind == "text" for d in doms):
            raise MoegrokError("data config: field 'num_steps' must be set when no domain has kind 'text'")
        _check_int("data config", "statements_per_doc", self.statements_per_doc, 1)
        if self.seq_len is not None:
            _check_int("data config", "seq_len", self.seq_len, 2)
        _check_int("data config", "val_docs", self.val_docs, 0)
        _check_int("data config", "probe_docs", self.probe_docs, 0)
        _check_int("data config", "seed", self.seed, 0)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise MoegrokError(f"data config: field 'tokenizer' must be null or a local directory path, "
                               f"got {self.tokenizer!r}")
        if self.num_steps is not None:
            for d in doms:
                if d.kind != "text" and self.num_steps * d.docs_per_step > 50_000_000:
                    raise MoegrokError(f"data config: domain '{d.name}' would need {self.num_steps} x "
                                       f"{d.docs_per_step} documents; at most 50,000,000 per domain")

    @property
    def batch_size(self) -> int:
        return sum(d.docs_per_step for d in self.domains)

    def replace(self, **changes: Any) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-ready) that :meth:`from_dict` reads back to an equal config."""
        out = dataclasses.asdict(self)
        out["domains"] = [{k: v for k, v in dataclasses.asdict(d).items() if v is not None} for d in self.domains]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """From a dict. ``domains`` is a list of domain dicts (each with ``name``) or a mapping name -> fields."""
        if not isinstance(d, Mapping):
            raise MoegrokError(f"data config: expected a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise MoegrokError(f"data config: unknown field(s) {unknown}; allowed: {names}")
        kw = dict(d)
        if "domains" in kw:
            kw["domains"] = tuple(_domain_from_any(x) for x in _domain_entries(kw["domains"]))
        return cls(**kw)


def _domain_entries(raw: Any) -> list[Mapping[str, Any]]:
    if isinstance(raw, Mapping):
        out = []
        for name, fields in raw.items():
            fields = {} if fields is None else fields
            if not isinstance(fields, Mapping):
                raise MoegrokError(f"data config: domain '{name}' must map to a dict of fields, got {fields!r}")
            if "name" in fields and fields["name"] != name:
                raise MoegrokError(f"data config: domain '{name}' has a conflicting field 'name': {fields['name']!r}")
            out.append({**fields, "name": name})
        return out
    if isinstance(raw, (list, tuple)):
        return list(raw)
    raise MoegrokError(f"data config: field 'domains' must be a list or a mapping, got {type(raw).__name__}")


def _domain_from_any(x: Any) -> DomainConfig:
    if isinstance(x, DomainConfig):
        return x
    if not isinstance(x, Mapping):
        raise MoegrokError(f"data config: each domain must be a dict of fields, got {x!r}")
    names = [f.name for f in dataclasses.fields(DomainConfig)]
    if "name" not in x:
        raise MoegrokError(f"data config: a domain has no field 'name' (fields given: {sorted(x)})")
    unknown = sorted(set(x) - set(names))
    if unknown:
        raise MoegrokError(f"data config: domain '{x['name']}': unknown field(s) {unknown}; allowed: {names}")
    return DomainConfig(**x)
