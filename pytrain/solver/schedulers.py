"""The lr_scheduler (linear warmup, then cosine decay) and beta2_scheduler of InternLM's configs.

Both set their value on every param group of the optimizer at construction (step 0) and at each step();
the Trainer steps them only after a successful optimizer step.
"""

import math


class WarmupCosineLR:
    """InternLM's FineTuneCosineAnnealingWarmupLR: lr 0 for the first init_steps steps, then a linear warmup
    over total_steps * warmup_ratio steps up to lr (step k of it at lr * (k + 1) / warmup_steps), then a half
    cosine down to eta_min at total_steps, eta_min after that."""

    def __init__(
        self,
        optimizer,
        total_steps: int,
        init_steps: int = 0,
        warmup_ratio: float = 0.0,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ):
        self.optimizer = optimizer
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self.total_steps, self.init_steps = total_steps, init_steps
        self.warmup_steps = int(total_steps * warmup_ratio)
        self.eta_min = eta_min
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr: float, step: int) -> float:
        if step < self.init_steps:
            return 0.0
        if step < self.init_steps + self.warmup_steps:
            return base_lr * (step - self.init_steps + 1) / self.warmup_steps
        decay_start = self.init_steps + self.warmup_steps
        progress = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
        return self.eta_min + (base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self) -> None:
        self.last_epoch += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(base, self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Continues from the saved position: the param groups get that step's lr."""
        saved = [float(lr) for lr in state["base_lrs"]]
        if len(saved) != len(self.optimizer.param_groups):  # another layout: one base lr for every group
            if len(set(saved)) != 1:
                raise ValueError(f"the saved lr scheduler has base lrs {saved}, this optimizer has other groups")
            saved = saved[:1] * len(self.optimizer.param_groups)
        self.base_lrs = saved
        self.last_epoch = int(state["last_epoch"])
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"], group["lr"] = base, self.lr_at(base, self.last_epoch)


class Beta2Scheduler:
    """beta2 = max(init_beta2, 1 - iter**(-c)) for c > 0 (beta2 grows toward 1); c <= 0 keeps init_beta2."""

    def __init__(self, optimizer, init_beta2: float, c: float = 0.8, cur_iter: int = -1):
        self.optimizer, self.init_beta2, self.c = optimizer, init_beta2, c
        self.cur_iter = cur_iter
        self.step()

    def beta2_at(self, iteration: int) -> float:
        if self.c <= 0 or iteration <= 0:
            return self.init_beta2
        return max(self.init_beta2, 1.0 - iteration ** (-self.c))

    def step(self) -> None:
        self.cur_iter += 1
        beta2 = self.beta2_at(self.cur_iter)
        for group in self.optimizer.param_groups:
            group["betas"] = (group["betas"][0], beta2)

    def state_dict(self) -> dict:
        return {"cur_iter": self.cur_iter}

    def load_state_dict(self, state: dict) -> None:
        """Continues from the saved iteration: the param groups get its beta2."""
        self.cur_iter = int(state["cur_iter"]) - 1
        self.step()
