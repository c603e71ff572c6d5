"""VIB masks (Dai et al. 2018): a Gaussian multiplicative mask per prunable unit.

Training: ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn per token. Evaluation: ``z = mu * keep`` where
``keep = log_alpha < threshold`` unless a budget fixed it. ``log_alpha = logvar - log(mu^2)``.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8


class VIBMask(nn.Module):
    """Mask parameters of one group of ``n`` units (the heads of a layer, the hidden dims, ...)."""

    def __init__(self, n: int, mu_init: float = 1.0, mu_std: float = 0.01, logvar_init: float = -9.0,
                 logvar_std: float = 0.01, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n = n
        self.mu = nn.Parameter(mu_init + mu_std * torch.randn(n, generator=generator))
        self.logvar = nn.Parameter(logvar_init + logvar_std * torch.randn(n, generator=generator))
        # a keep set fixed by a budget (see VIB.apply_budget); unused while `fixed` is False
        self.register_buffer("fixed_keep", torch.ones(n, dtype=torch.bool))
        self.register_buffer("fixed", torch.tensor(False))

    def log_alpha(self) -> torch.Tensor:
        return self.logvar - torch.log(self.mu.pow(2) + EPS)  # (n,)

    def kl(self) -> torch.Tensor:
        """``0.5 * sum_j log(1 + mu_j^2 / (sigma_j^2 + 1e-8))`` (the VIB upper bound, up to a constant)."""
        return 0.5 * torch.log1p(self.mu.pow(2) / (self.logvar.exp() + EPS)).sum()

    def keep_prob(self, sharpness: float, threshold: float, offset: float = 0.0) -> torch.Tensor:
        """Differentiable keep probability ``sigmoid(-k * (log_alpha + offset - threshold))``, shape (n,)."""
        return torch.sigmoid(-sharpness * (self.log_alpha() + offset - threshold))

    def hard_keep(self, threshold: float) -> torch.Tensor:
        """Boolean keep decision, shape (n,): the budget's when fixed, else the threshold rule."""
        if bool(self.fixed):
            return self.fixed_keep.clone()
        return (self.log_alpha() < threshold).detach()

    def sample(self, lead_shape: tuple[int, ...]) -> torch.Tensor:
        """A training sample, shape (*lead_shape, n): independent noise per token."""
        eps = torch.randn(*lead_shape, self.n, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + torch.exp(0.5 * self.logvar) * eps

    def fix(self, keep: torch.Tensor | None) -> None:
        """Fix the keep set (a budget's selection), or release it with ``None``."""
        if keep is None:
            self.fixed.fill_(False)
            self.fixed_keep.fill_(True)
        else:
            self.fixed_keep.copy_(keep.to(self.fixed_keep.device).bool())
            self.fixed.fill_(True)

    def extra_repr(self) -> str:
        return f"n={self.n}"
