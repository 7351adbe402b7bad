"""Learning-rate schedules (``optimizer.schedule``): a factor on the configured learning
rates by step, set before each step on the dense optimizer's parameter groups and (with
``schedule.sparse``) on every table group's row optimizer.

With ``t`` the steps taken before this one, ``W = warmup_steps`` and ``u = t - W``::

    t < W:                  f = warmup_start + (1 - warmup_start) * (t + 1) / W
    decay none:             f = 1
    decay linear:           f = 1 - (1 - min_ratio) * min(u / D, 1)
    decay cosine:           f = min_ratio + (1 - min_ratio) * (1 + cos(pi * min(u / D, 1))) / 2
    decay step:             f = gamma ** (u // step_every)

``D = decay_steps`` (default: ``train.steps - W``). The factor is a function of the step
alone, so a resumed run continues the schedule where the checkpoint left it.
"""

from __future__ import annotations

import math
from typing import Any

from terarec.config import Config, ConfigError, LRDecay


class LRSchedule:
    """The schedule of a run (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.s = cfg.optimizer.schedule
        self.dense_lr = cfg.optimizer.dense.lr
        self.sparse_lr = cfg.optimizer.sparse.lr
        self.decay_steps = self.s.decay_steps
        if self.s.decay in (LRDecay.LINEAR, LRDecay.COSINE) and self.decay_steps is None:
            steps = cfg.train.steps
            if steps is None or steps <= self.s.warmup_steps:
                raise ConfigError("optimizer.schedule.decay_steps: required for a linear or "
                                  "cosine decay when train.steps does not say how many "
                                  "steps follow the warm-up")
            self.decay_steps = steps - self.s.warmup_steps
        self.active = self.s.warmup_steps > 0 or self.s.decay != LRDecay.NONE

    def factor(self, t: int) -> float:
        """The factor of the step taken after ``t`` steps."""
        s = self.s
        if t < s.warmup_steps:
            return s.warmup_start + (1.0 - s.warmup_start) * (t + 1) / s.warmup_steps
        u = t - s.warmup_steps
        if s.decay == LRDecay.NONE:
            return 1.0
        if s.decay == LRDecay.STEP:
            return float(s.gamma ** (u // s.step_every))
        assert self.decay_steps is not None
        x = min(u / self.decay_steps, 1.0)
        if s.decay == LRDecay.LINEAR:
            return 1.0 - (1.0 - s.min_ratio) * x
        return s.min_ratio + (1.0 - s.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))

    def apply(self, t: int, dense_optimizer: Any, embedding: Any) -> float:
        """Sets the learning rates of the step after ``t`` steps; returns the dense one."""
        f = self.factor(t)
        lr = self.dense_lr * f
        for group in dense_optimizer.param_groups:
            group["lr"] = lr
        if self.s.sparse:
            for g in embedding.groups:
                g.optimizer.lr = self.sparse_lr * f
        return lr
