"""Config -> optimizer and learning-rate schedule: the one place where ``OptimConfig`` becomes them."""

from __future__ import annotations

from typing import Iterable

import torch

from dualssl.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``cfg``; the scheduler steps once an epoch.

    * ``adam``: Adam with L2 ``weight_decay`` (the follow-up's; dualssl's default).
    * ``sgd``: SGD with Nesterov ``momentum`` (nnU-Net v2's: lr 1e-2, momentum 0.99, weight decay 3e-5).

    Both decay the learning rate polynomially to 0 over ``epochs``: ``lr * (1 - epoch / epochs) ** poly_power``
    (nnU-Net's PolyLRScheduler, per epoch).
    """
    cfg.validate()
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                                           weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs, power=cfg.poly_power)
    return optimizer, scheduler
