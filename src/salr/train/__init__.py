"""Fine-tuning: `config` (TrainConfig and the methods), `residual_lr` (Theorem 4), `state` (checkpoints, resume,
distributed), `loop` (the training loop and `run_training`, what `salr train` does)."""

from salr.train.config import METHODS, TrainConfig, method_config
from salr.train.loop import every_position_examples, load_examples, prepare_model, run_training, train

__all__ = [
    "METHODS",
    "TrainConfig",
    "every_position_examples",
    "load_examples",
    "method_config",
    "prepare_model",
    "run_training",
    "train",
]
