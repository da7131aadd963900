"""Mixed-domain corpora and the deterministic one-epoch pipeline.

Public API::

    from moegrok.data import DataConfig, DomainConfig, build_corpus
    cfg = DataConfig.from_dict({"num_steps": 7500, "domains": {"math": {"docs_per_step": 16},
                                                               "knowledge": {"docs_per_step": 16}}})
    corpus = build_corpus(cfg)
    corpus.batch(step)      # {"tokens" int32 [B,T], "mask" bool [B,T], "sample_ids" int64 [B], "domain_ids" int32 [B]}
    corpus.probe_set(); corpus.val_set("math"); corpus.test_set("math")
"""
from moegrok.data.config import KINDS, SYNTHETIC_KINDS, DataConfig, DomainConfig
from moegrok.data.corpus import Corpus, build_corpus
from moegrok.data.tokenizer import BuiltinTokenizer, HFTokenizer, Tokenizer

__all__ = ["KINDS", "SYNTHETIC_KINDS", "BuiltinTokenizer", "Corpus", "DataConfig", "DomainConfig", "HFTokenizer",
           "Tokenizer", "build_corpus"]
