"""Linear probe: multinomial logistic regression on frozen, standardised features.

Full-batch L-BFGS (strong-Wolfe line search) on cross-entropy + weight_decay/2 * ||W||^2: the
problem is convex, so the result depends on the data and weight decay only, not on learning
rates or epochs; no sklearn, so it runs on the GPU next to the encoder when one is there.
Features are standardised with the training split's mean and std.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simscale.errors import DataError


def fit_linear(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
):
    """Fit the probe; returns a function features -> logits."""
    if len(train_f) == 0:
        raise DataError("the linear probe needs at least one training sample")
    x = train_f.float()
    y = train_y.long().to(x.device)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    num_classes = num_classes or int(y.max()) + 1
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: ((f.float().to(x.device) - mean) / std) @ weight + bias


def linear_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy in [0, 1] of the logistic-regression probe on the validation split."""
    if len(val_f) == 0:
        raise DataError("the linear probe needs at least one validation sample")
    logits = fit_linear(train_f, train_y, num_classes, weight_decay, max_iter)(val_f)
    return (logits.argmax(1).cpu() == val_y.long().cpu()).double().mean().item()


def cli_main(args) -> int:
    from simscale.console import make_console
    from rich.table import Table

    from simscale.eval.features import encode_splits

    (train_f, train_y), (val_f, val_y), n_classes = encode_splits(args)
    wd = getattr(args, "weight_decay", 1e-4)
    top1 = linear_top1(train_f, train_y, val_f, val_y, n_classes, wd)
    table = Table(title=f"linear probe: {args.model}")
    for col in ("weight decay", "top-1 (%)", "n_train", "n_val", "classes"):
        table.add_column(col, justify="right")
    table.add_row(f"{wd:g}", f"{100 * top1:.2f}", str(len(train_f)), str(len(val_f)), str(n_classes))
    make_console().print(table)
    return 0
