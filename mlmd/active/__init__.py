"""On-the-fly learning: oracles, labelling (in process or Dask), fine-tuning, hooks, the loop."""
from .finetune import FinetuneConfig, finetune_committee, trainable_from_potential
from .hooks import RetrainingHook
from .hosts import ASEHost, EngineHost, OpenMMHost
from .labeling import Label, label_frames, make_client
from .loop import ActiveLearner, ActiveLearningReporter, ModelLostError
from .oracles import ORACLES, make_oracle

__all__ = ["FinetuneConfig", "finetune_committee", "trainable_from_potential", "RetrainingHook", "ASEHost",
           "EngineHost", "OpenMMHost", "Label", "label_frames", "make_client", "ActiveLearner",
           "ActiveLearningReporter", "ModelLostError", "ORACLES", "make_oracle"]
