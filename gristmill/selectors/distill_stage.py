"""``distill``: dataset distillation (MTT + AST) as a global pipeline stage.

The stage collects every row's feature vector (or flat image) and label,
trains expert trajectories on them and distils ``ipc`` synthetic examples per
class by trajectory matching (``gristmill.trainers.distill``, which cites
Cazenavette et al. 2022 and Shen et al. (AST) and writes their formulas). It
keeps every row unchanged; what it publishes are three files under
``OUTPUT/artifacts/<stage name>/``: ``synthetic.parquet`` (``classes x ipc``
rows of ``id``, ``features`` or ``image``, ``label``), ``learned_lr.json`` and
``report.png`` (see ``gristmill.trainers.distill_output``).

Phases: ``summarize`` takes ids, features and labels of a batch; ``merge``
concatenates; ``finalize`` orders the rows by id, so the result does not
depend on how the engine partitioned the input, and runs the distillation.

.. code-block:: yaml

    stages:
      - stage: distill
        feature_column: features      # list of numbers, or JSON arrays as text
        label_column: label
        image_shape: [1, 8, 8]        # optional: rows are flat C*H*W images
        model: mlp                    # or convnet (needs image_shape)
        recipe: ast                   # expert and distillation defaults: ast or mtt
        experts: {num_experts: 5, epochs: 20}
        distill: {ipc: 10, iterations: 300, weight_perturb: false}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from gristmill.pipeline.stage import GlobalStage, StageOutput, StageParams, keep_all
from gristmill.trainers.distill_data import column_as_matrix


class DistillParams(StageParams):
    feature_column: str = Field("features", min_length=1,
                                description="column of feature vectors or flat images")
    label_column: str = Field("label", min_length=1, description="column of class labels")
    image_shape: tuple[int, int, int] | None = Field(
        None, description="(C, H, W) of flat image rows; required by model convnet")
    model: Literal["mlp", "convnet"] = "mlp"
    width: int | None = Field(None, ge=1, le=4096, description="hidden units / channels")
    depth: int = Field(2, ge=1, le=8, description="hidden layers / conv blocks")
    threads: int = Field(1, ge=1, le=256, description="torch CPU threads while distilling")
    recipe: Literal["ast", "mtt"] = Field(
        "ast", description="defaults of experts and distill: AST smooth experts with every "
                           "addition, or plain MTT")
    experts: dict[str, Any] = Field(default_factory=dict,
                                    description="overrides of ExpertConfig")
    distill: dict[str, Any] = Field(default_factory=dict,
                                    description="overrides of DistillConfig")

    @model_validator(mode="after")
    def _configs_build(self) -> DistillParams:
        if self.model == "convnet" and self.image_shape is None:
            raise ValueError("model 'convnet' needs image_shape (C, H, W)")
        if self.image_shape is not None and min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be positive, got {self.image_shape}")
        # Build both configs now so that a bad key fails when the recipe is
        # loaded, not after the data has been read.
        expert_config(self)
        distill_config(self, seed=0)
        return self


def expert_config(params: DistillParams):
    from gristmill.trainers.experts import ExpertConfig

    build = ExpertConfig.ast if params.recipe == "ast" else ExpertConfig.mtt
    try:
        return build(**params.experts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"experts: {e}") from None


def distill_config(params: DistillParams, seed: int):
    from gristmill.trainers.distill import DistillConfig

    build = DistillConfig.ast if params.recipe == "ast" else DistillConfig.mtt
    try:
        return build(**{"seed": seed, **params.distill})
    except (TypeError, ValueError) as e:
        raise ValueError(f"distill: {e}") from None


@dataclass
class DistillSummary:
    """Rows seen so far: ids, features (n, d) float32 and labels."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray


@dataclass
class DistillState:
    """What finalize learned; ``files`` are the published artifacts."""

    rows_in: int
    learned_lr: float
    files: dict[str, bytes]


class Distill(GlobalStage):
    """Distil the labelled rows into a small synthetic set; rows pass through unchanged."""

    type_name = "distill"
    Params = DistillParams
    extras = ("distill",)

    def summarize(self, batch: pa.Table) -> DistillSummary | None:
        if batch.num_rows == 0:
            return None
        p = self.params
        for col in (p.feature_column, p.label_column):
            if col not in batch.column_names:
                raise ValueError(f"stage {self.name!r}: no column {col!r}; the batch has "
                                 f"{batch.column_names} (list it in the source's `columns`)")
        x = column_as_matrix(batch.column(p.feature_column), p.feature_column)
        if p.image_shape is not None and x.shape[1] != int(np.prod(p.image_shape)):
            raise ValueError(f"stage {self.name!r}: rows of {p.feature_column!r} have "
                             f"{x.shape[1]} values, image_shape {p.image_shape} needs "
                             f"{int(np.prod(p.image_shape))}")
        labels = batch.column(p.label_column)
        if labels.null_count:
            raise ValueError(f"stage {self.name!r}: {labels.null_count} rows have no "
                             f"{p.label_column!r}")
        return DistillSummary(ids=np.asarray(batch.column("id").to_pylist(), dtype=object),
                              x=x, y=np.asarray(labels.to_pylist()))

    def merge(self, a: DistillSummary, b: DistillSummary) -> DistillSummary:
        return DistillSummary(ids=np.concatenate([a.ids, b.ids]), x=np.concatenate([a.x, b.x]),
                              y=np.concatenate([a.y, b.y]))

    def finalize(self, summary: DistillSummary | None) -> DistillState | None:
        if summary is None:
            return None
        from gristmill.trainers.distill import distill_dataset
        from gristmill.trainers.distill_output import distill_artifacts

        order = np.argsort(summary.ids, kind="stable")
        x, y = summary.x[order], summary.y[order]
        p = self.params
        outcome = distill_dataset(x, y, model=p.model, image_shape=p.image_shape,
                                  experts=expert_config(p),
                                  config=distill_config(p, seed=self.seed), width=p.width,
                                  depth=p.depth, threads=p.threads)
        files = distill_artifacts(outcome, x, y, p.image_shape)
        return DistillState(rows_in=len(y), learned_lr=outcome.lr, files=files)

    def artifacts(self, state: DistillState | None) -> dict[str, bytes]:
        return {} if state is None else dict(state.files)

    def apply(self, batch: pa.Table, state: DistillState | None) -> StageOutput:
        return keep_all(batch)
