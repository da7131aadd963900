"""DataConfig / DomainConfig: parsing from dicts, defaults, and errors that name the field and what it accepts."""
from __future__ import annotations

import pytest
import yaml

from moegrok.data import DataConfig, DomainConfig
from moegrok.errors import MoegrokError


def test_defaults_are_the_prototype_setting():
    cfg = DataConfig()
    assert [(d.name, d.kind, d.docs_per_step) for d in cfg.domains] == [("math", "math", 16),
                                                                       ("knowledge", "knowledge", 16)]
    assert (cfg.batch_size, cfg.num_steps, cfg.statements_per_doc) == (32, 7500, 8)
    m, k = cfg.domains
    assert (m.modulus, m.heldout_frac, k.entities, k.relations, k.heldout_frac) == (47, 0.5, 20, 10, 0.15)


def test_from_dict_mapping_and_list_forms_agree_and_round_trip():
    text = """
    num_steps: 100
    seed: 3
    domains:
      math: {docs_per_step: 16, modulus: 31}
      math_twin: {docs_per_step: 8}
      facts: {kind: knowledge, docs_per_step: 8, entities: 12}
    """
    a = DataConfig.from_dict(yaml.safe_load(text))
    b = DataConfig.from_dict({"num_steps": 100, "seed": 3, "domains": [
        {"name": "math", "docs_per_step": 16, "modulus": 31}, {"name": "math_twin", "docs_per_step": 8},
        {"name": "facts", "kind": "knowledge", "docs_per_step": 8, "entities": 12}]})
    assert a == b and a.batch_size == 32
    twin = a.domains[1]
    assert (twin.kind, twin.twin, twin.modulus) == ("math", True, 47)
    assert DataConfig.from_dict(yaml.safe_load(yaml.safe_dump(a.to_dict()))) == a


@pytest.mark.parametrize("raw,match", [
    ({"num_step": 5}, r"unknown field\(s\) \['num_step'\]; allowed: \['domains', 'num_steps'"),
    ({"domains": {"math": {"modulos": 5}}}, r"domain 'math': unknown field\(s\) \['modulos'\]; allowed: \['name'"),
    ({"domains": {"foo": {}}}, r"domain 'foo': field 'kind' is required \(one of \['math', 'knowledge', 'code', "
                               r"'retrieval', 'text'\]"),
    ({"domains": {"foo": {"kind": "chess"}}}, r"field 'kind' must be one of \['math', .*'text'\], got 'chess'"),
    ({"domains": {"math": {"entities": 5}}}, r"domain 'math': field 'entities' applies to kinds \['knowledge'\]"),
    ({"domains": {"math": {"train_path": "x.txt"}}}, r"field 'train_path' applies to kind 'text' only"),
    ({"domains": {"math": {"heldout_frac": 1.0}}}, r"field 'heldout_frac' must be a number in \(0, 1\), got 1.0"),
    ({"domains": {"math": {"docs_per_step": 0}}}, r"field 'docs_per_step' must be an integer >= 1, got 0"),
    ({"domains": {"math": {"modulus": 1}}}, r"field 'modulus' must be an integer >= 2"),
    ({"domains": {"text": {}}}, r"field 'train_path' is required for kind 'text'"),
    ({"domains": {"t": {"kind": "text", "train_path": "a", "text_format": "csv"}}},
     r"field 'text_format' must be one of \['auto', 'jsonl', 'lines', 'paragraphs'\]"),
    ({"domains": {"t": {"kind": "text", "train_path": "a", "twin": True}}}, r"field 'twin' applies to synthetic"),
    ({"domains": []}, r"at least one domain"),
    ({"domains": 5}, r"field 'domains' must be a list or a mapping"),
    ({"domains": [{"docs_per_step": 2}]}, r"a domain has no field 'name'"),
    ({"num_steps": None}, r"field 'num_steps' must be set when no domain has kind 'text'"),
    ({"num_steps": 0}, r"field 'num_steps' must be an integer >= 1"),
    ({"seq_len": 1}, r"field 'seq_len' must be an integer >= 2"),
    ({"tokenizer": 3}, r"field 'tokenizer' must be null or a local directory path"),
    ("math", r"expected a mapping"),
])
def test_bad_fields_are_named(raw, match):
    with pytest.raises(MoegrokError, match=match):
        DataConfig.from_dict(raw)


def test_duplicate_domain_names_rejected():
    with pytest.raises(MoegrokError, match=r"unique, repeated: \['math'\]"):
        DataConfig(domains=(DomainConfig("math"), DomainConfig("math")))


def test_configs_are_frozen():
    cfg = DataConfig()
    with pytest.raises(Exception):
        cfg.seed = 2
    assert cfg.replace(seed=2).seed == 2 and cfg.seed == 0
