"""Training: typed run config, the pure step, the loop, optimizer, checkpoints."""

from moejax.train.config import RunConfig, TrainConfig, default_config, parse
from moejax.train.loop import train_and_evaluate
from moejax.train.optimizer import OptimizerConfig, make_optimizer
from moejax.train.program import Evaluator, init_state
from moejax.train.state import TrainState
from moejax.train.step import make_eval_step, make_train_step

__all__ = [
    "Evaluator", "OptimizerConfig", "RunConfig", "TrainConfig", "TrainState",
    "default_config", "init_state", "make_eval_step", "make_optimizer",
    "make_train_step", "parse", "train_and_evaluate",
]
