"""Trial stages: where compression plugs into the one training loop.

:mod:`~trainables.stages.base` says what a stage is (its hooks and what they see),
:mod:`~trainables.stages.pipeline` runs the stages a config asks for in their order
(low-rank, prune, LC, quant, weight rounding, export). This ``__init__`` registers the
built-in stages (prune, lc, quant, weight_rounding, export); each stage module only defines its
stage and its builder.

Example::

    pipeline = build_pipeline(TrialConfig().with_overrides(["quant.mode=qat"]))
    [s.name for s in pipeline]          # ["quant"]
"""

from trainables.stages.base import (
    FinalizeContext,
    Stage,
    StageContext,
    TrainingPlan,
    diverged_reason,
    nonfinite_params,
)
from trainables.stages.export import build_export_stage
from trainables.stages.lc import build_lc_stage
from trainables.stages.pipeline import (
    STAGE_ORDER,
    Pipeline,
    build_pipeline,
    register_stage,
    registered,
)
from trainables.stages.prune import build_prune_stage
from trainables.stages.quant import build_quant_stage
from trainables.stages.weight_rounding import build_weight_rounding

register_stage("prune", build_prune_stage)
register_stage("lc", build_lc_stage)
register_stage("quant", build_quant_stage)
register_stage("weight_rounding", build_weight_rounding)
register_stage("export", build_export_stage)

__all__ = ["Stage", "StageContext", "FinalizeContext", "TrainingPlan", "Pipeline",
           "STAGE_ORDER", "build_pipeline", "register_stage", "registered",
           "nonfinite_params", "diverged_reason"]
