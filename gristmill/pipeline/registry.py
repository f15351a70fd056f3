"""Stage names a recipe can use, mapped to their classes.

Three ways a recipe names a stage:

- a built-in name from ``STAGES`` below (``"type_name":
  "gristmill.<package>.<module>:<Class>"``, one line per stage);
- a name that an installed package registers in the ``gristmill.stages``
  entry-point group (``[project.entry-points."gristmill.stages"]
  my_stage = "mypkg.stages:MyStage"`` in its ``pyproject.toml``);
- ``module:Class`` directly (``stage: mypkg.stages:MyStage``), for a module
  on the Python path.

Classes are imported lazily so that checking a recipe never imports torch or
transformers unless a stage of the recipe needs them. See docs/stages.md.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points

from gristmill.pipeline.stage import Stage

STAGES: dict[str, str] = {
    # selectors
    "grape": "gristmill.selectors.grape:Grape",
    "distill": "gristmill.selectors.distill_stage:Distill",
    "exact_dedup": "gristmill.selectors.dedup:ExactDedup",
    "minhash_dedup": "gristmill.selectors.minhash:MinHashDedup",
    "line_dedup": "gristmill.selectors.unit_dedup:LineDedup",
    "paragraph_dedup": "gristmill.selectors.unit_dedup:ParagraphDedup",
    "substring_dedup": "gristmill.selectors.substring_dedup:SubstringDedup",
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


ENTRY_POINT_GROUP = "gristmill.stages"


def plugin_stages() -> dict[str, str]:
    """Stages registered by installed packages: name -> ``module:Class``.

    A plugin cannot replace a built-in name; such an entry is ignored.
    """
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in STAGES}


def all_stages() -> dict[str, str]:
    """Every stage name a recipe can use (built-in and plugins) -> ``module:Class``."""
    return {**STAGES, **plugin_stages()}


def _load(target: str, shown: str) -> type[Stage]:
    module, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"stage {shown!r}: cannot import module {module!r} ({e}); every "
                         f"worker must be able to import it (install the package or put it "
                         f"on PYTHONPATH)") from None
    cls = getattr(mod, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ValueError(f"stage {shown!r}: {module}.{cls_name} is not a gristmill Stage "
                         f"class (a subclass of RowStage, GlobalStage or ShuffleStage)")
    if cls.kind not in ("row", "global", "shuffle"):
        raise ValueError(f"stage {shown!r}: {module}.{cls_name} must subclass RowStage, "
                         f"GlobalStage or ShuffleStage, not Stage itself")
    return cls


def stage_class(type_name: str) -> type[Stage]:
    """The class registered under ``type_name`` (or named ``module:Class``);
    ValueError suggests the closest valid names."""
    if ":" in type_name:
        module, _, cls_name = type_name.partition(":")
        if not module or not cls_name.isidentifier():
            raise ValueError(f"stage {type_name!r}: write a plugin stage as module:Class, "
                             f"e.g. mypkg.stages:MyStage")
        return _load(type_name, type_name)
    if type_name in STAGES:  # built-in: no need to scan the installed packages
        return _load(STAGES[type_name], type_name)
    known = all_stages()
    if type_name not in known:
        close = difflib.get_close_matches(type_name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        valid = ", ".join(sorted(known))
        raise ValueError(f"unknown stage {type_name!r}{hint}; valid stages: {valid}; or name a "
                         f"plugin class as module:Class") from None
    return _load(known[type_name], type_name)
