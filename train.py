"""The main job from a checkout: `python train.py [...]` is `python -m deepseek_jax.train [...]`
(the trainer lives in `deepseek_jax/train.py`; installed, `deepseek-jax train`)."""

from __future__ import annotations


from deepseek_jax import errors
from deepseek_jax import train as trainer
from deepseek_jax.train import (DEFAULT_CONFIG, RESUMABLE, build, resumable,  # noqa: F401
                                resume_config, run)


def main(argv=None) -> int:
  return trainer.main(argv, prog="train.py")


if __name__ == "__main__":   # one error path: one line, no traceback unless --debug
  errors.command(trainer.main, "train.py")
