"""Stage names a recipe can use, mapped to their classes.

Classes are imported lazily so that checking a recipe never imports torch or
transformers unless a stage of the recipe needs them. Add a stage with one
line here: ``"type_name": "gristmill.<package>.<module>:<Class>"``.
"""

from __future__ import annotations

import importlib

from gristmill.pipeline.stage import Stage

STAGES: dict[str, str] = {
    # selectors
    "grape": "gristmill.selectors.grape:Grape",
    "distill": "gristmill.selectors.distill_stage:Distill",
    "exact_dedup": "gristmill.selectors.dedup:ExactDedup",
    "minhash_dedup": "gristmill.selectors.minhash:MinHashDedup",
    "gopher": "gristmill.selectors.filters.gopher_quality:GopherFilter",
    "length_filter": "gristmill.selectors.filters.length:LengthFilter",
    "gopher_repetition": "gristmill.selectors.filters.gopher_repetition:GopherRepetition",
    "c4_lines": "gristmill.selectors.filters.c4_lines:C4Lines",
    "fineweb_lines": "gristmill.selectors.filters.fineweb_lines:FineWebLines",
    "url_filter": "gristmill.selectors.filters.url:UrlFilter",
    "filter": "gristmill.selectors.filters.expression:ExpressionFilter",
    "language_id": "gristmill.selectors.filters.language_id:LanguageId",
    "decontaminate": "gristmill.selectors.filters.decontaminate:Decontaminate",
    "pii": "gristmill.formatters.pii:Pii",
    "mix": "gristmill.selectors.mix:Mix",
    "sample": "gristmill.selectors.sample:Sample",
    "top_fraction": "gristmill.selectors.top_fraction:TopFraction",
    # scorers
    "text_stats": "gristmill.scorers.text_stats:TextStats",
    "embeddings": "gristmill.scorers.embeddings:Embeddings",
    "lm_likelihood": "gristmill.scorers.likelihood:LMLikelihood",
    "predictive_strength": "gristmill.scorers.predictive:PredictiveStrength",
    "preselect_label": "gristmill.scorers.predictive:PreSelectLabel",
    "fasttext": "gristmill.scorers.fasttext:FastTextScorer",
}


def stage_class(type_name: str) -> type[Stage]:
    """The class registered under ``type_name``; ValueError lists the valid names."""
    try:
        target = STAGES[type_name]
    except KeyError:
        valid = ", ".join(sorted(STAGES))
        raise ValueError(f"unknown stage {type_name!r}; valid stages: {valid}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
