"""Training (V3 report §4): state, optimizer, pure step, data, checkpoints, metrics, report."""

from deepseek_jax.training.checkpoint import Checkpointer
from deepseek_jax.training.data import Data, make_data
from deepseek_jax.training.metrics import MetricsWriter, ProgressBar, peak_flops
from deepseek_jax.training.optimizer import lr_schedule, make_optimizer
from deepseek_jax.training.report import finish_report
from deepseek_jax.training.state import (TrainState, abstract_state, init_state, make_init_fn,
                                         model_variables, param_count, variables_of)
from deepseek_jax.training.step import eval_step, train_step

__all__ = ["Checkpointer", "Data", "MetricsWriter", "ProgressBar", "TrainState", "abstract_state",
           "eval_step", "finish_report", "init_state", "lr_schedule", "make_data", "make_init_fn",
           "make_optimizer", "model_variables", "param_count", "peak_flops",
           "train_step", "variables_of"]
