"""Dense (MLP) optimizers from the config: the one switch on ``DenseOptimKind``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from terarec.config import DenseOptimConfig, DenseOptimKind


def build_dense_optimizer(
    cfg: DenseOptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no dense parameters to optimize")
    if cfg.kind == DenseOptimKind.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.kind == DenseOptimKind.ADAGRAD:
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
