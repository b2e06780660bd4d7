"""Adam's update in kernels a CUDA graph can replay while its schedule moves.

torch's fused Adam takes beta1 as a kernel argument, which a captured graph keeps at its
capture-time value, and a one-cycle schedule moves beta1 every step. Here the learning rate and
beta1 are device tensors, refilled before each replay, and the update is torch's Adam (and
AdamW) formula in foreach kernels: the same step as torch's up to rounding, on the optimizer's
own state, so its launched steps, checkpoints and schedules carry on unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `GraphAdam` cannot stand in for `optimizer`'s step, or None when it can."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(optimizer).__name__} is not Adam or AdamW"
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["maximize"] or group.get("differentiable"):
            return "amsgrad, maximize or differentiable is set"
        if any(isinstance(group[k], Tensor) for k in ("lr", "weight_decay", "eps")):
            return "a hyperparameter is a tensor"
        if any(isinstance(b, Tensor) for b in group["betas"]):
            return "a beta is a tensor"
        if any(p.is_complex() for p in group["params"]):
            return "a parameter is complex"
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        return "its parameters have stepped unequally often"
    return None


class GraphAdam:
    """`step()`: `optimizer`'s Adam update of the parameters' current gradients, reading the
    learning rate and beta1 from device tensors that `load_hyperparameters()` refills from the
    param groups (a scheduler's latest). Missing state is made as torch's would be (zeros)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        # An LR scheduler warns of a skipped first step unless `optimizer.step()` was called;
        # this update is that step.
        optimizer._opt_called = True  # type: ignore[attr-defined]
        adamw = isinstance(optimizer, torch.optim.AdamW)
        self._groups = []
        for group in optimizer.param_groups:
            params = list(group["params"])
            device = params[0].device
            for p in params:
                state = optimizer.state[p]
                if not state:
                    # As torch makes it for a fused or capturable Adam: the step on the device.
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lr = torch.zeros((), dtype=torch.float32, device=device)
            beta1 = torch.zeros((), dtype=torch.float32, device=device)
            decoupled = group.get("decoupled_weight_decay", adamw)
            self._groups.append((group, params, lr, beta1, decoupled))
        self.load_hyperparameters()

    def load_hyperparameters(self) -> None:
        """Copy each group's learning rate and beta1 into the tensors `step` reads (a fill
        kernel each, no sync)."""
        for group, _, lr, beta1, _ in self._groups:
            lr.fill_(group["lr"])
            beta1.fill_(group["betas"][0])

    @torch.no_grad()
    def step(self) -> None:
        """One Adam (or AdamW) update, as torch computes it, of parameters with gradients."""
        for group, all_params, lr, beta1, decoupled in self._groups:
            params = [p for p in all_params if p.grad is not None]
            if not params:
                continue
            state = [self._optimizer.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in state]
            exp_avg_sqs = [s["exp_avg_sq"] for s in state]
            steps = [s["step"] for s in state]
            beta2, eps, weight_decay = group["betas"][1], group["eps"], group["weight_decay"]
            torch._foreach_add_(steps, 1)
            if weight_decay:
                if decoupled:
                    torch._foreach_mul_(params, 1 - lr * weight_decay)
                else:
                    grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
            # exp_avg = beta1 * exp_avg + (1 - beta1) * grad, beta1 read from the device
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, 1 - beta1))
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            # Every parameter here has stepped as often: one bias correction serves them all.
            step = steps[0]
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step).sqrt()
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, bias_correction2_sqrt)
            torch._foreach_add_(denominators, eps)
            updates = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_mul_(updates, step_size)
            torch._foreach_sub_(params, updates)
