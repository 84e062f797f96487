"""Privacy accounting of DP-SGD: Renyi DP of the Poisson-subsampled Gaussian mechanism (built in,
checked against opacus in tests/privacy), opacus' PRV accountant, and noise calibration."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# Renyi orders searched for the tightest (epsilon, delta) conversion: fine steps below 11, where
# the optimum sits for epsilon of a few; integers above for small epsilon and large noise.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256])


# --- accounting: Renyi DP of the Poisson-subsampled Gaussian mechanism ---------------------------

def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log E_{z~N(0,s^2)}[(mu(z)/mu0(z))^alpha] for integer alpha: a finite binomial sum."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """The same moment for real alpha, by quadrature of
    A - 1 = E_{z~mu0}[((1-q) + q e^{u(z)})^alpha - 1], u(z) = log(mu1(z)/mu0(z)) = (2z-1)/(2 s^2).

    Integrating A - 1 rather than A keeps its tiny value (order q^2) exact to many digits, and the
    trapezoid rule is spectrally accurate for this smooth integrand that decays to e^-72 at both
    ends of the grid (mu0's left tail; on the right mu0 e^{alpha u}, a Gaussian around alpha)."""
    h = sigma / 40
    z = np.arange(-12 * sigma - 1, alpha + 12 * sigma + 1 + h, h)
    u = (2 * z - 1) / (2 * sigma**2)
    with np.errstate(over="ignore"):
        # log((1-q) + q e^u): log1p form near u = 0 (where it is ~q u), logaddexp where e^u is huge.
        log_mix = np.where(u < 30, np.log1p(q * np.expm1(np.minimum(u, 30))),
                           np.logaddexp(math.log1p(-q), math.log(q) + u))
    log_mu0 = -z * z / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    ax = alpha * log_mix
    with np.errstate(over="ignore"):
        f = np.where(ax < 50, np.exp(log_mu0) * np.expm1(np.minimum(ax, 50)), np.exp(log_mu0 + ax) - np.exp(log_mu0))
    return math.log1p(float(np.sum(f) * h))


def rdp_sampled_gaussian(q: float, sigma: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Renyi DP of one step of the Gaussian mechanism (noise sigma x sensitivity) applied to a
    Poisson sample of rate q, at each order -> `[len(orders)]`; add over steps."""
    if q == 0:
        return np.zeros(len(orders))
    if sigma == 0:
        return np.full(len(orders), np.inf)
    out = []
    for a in orders:
        if q == 1.0:
            out.append(a / (2 * sigma**2))
        elif float(a).is_integer():
            out.append(_log_a_integer(q, sigma, int(a)) / (a - 1))
        else:
            out.append(_log_a_fractional(q, sigma, float(a)) / (a - 1))
    return np.asarray(out)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """Tightest (epsilon, order) for `delta` over the orders, with the conversion of Balle et al.
    2020 (tighter than the classic `rdp + log(1/delta)/(alpha-1)`)."""
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isfinite(eps), eps, np.inf)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), float(a[best])


class RDPAccountant:
    """Composes steps of (noise multiplier, sampling rate) and reports epsilon for a delta."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS):
        self.orders = tuple(orders)
        self.history: list[list[float]] = []  # [sigma, q, steps], merged while settings repeat
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Account for `num_steps` more steps at these settings."""
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += num_steps
        else:
            self.history.append([noise_multiplier, sample_rate, num_steps])

    def _rdp_per_step(self, sigma: float, q: float) -> np.ndarray:
        if (sigma, q) not in self._cache:
            self._cache[(sigma, q)] = rdp_sampled_gaussian(q, sigma, self.orders)
        return self._cache[(sigma, q)]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before any step)."""
        if not self.history:
            return 0.0
        rdp = sum(self._rdp_per_step(s, q) * n for s, q, n in self.history)
        return epsilon_from_rdp(rdp, delta, self.orders)[0]


class OpacusAccountant:
    """opacus' accountants (`prv`: privacy loss random variables, tight for many steps) behind
    the same two methods."""

    def __init__(self, name: str = "prv"):
        try:
            from opacus.accountants import create_accountant
        except ImportError as e:
            raise ValueError(f"privacy.accountant={name} needs opacus: pip install -e '.[dp]'") from e
        self.name = name
        self._acc = create_accountant(name)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Account for `num_steps` more steps at these settings."""
        for _ in range(num_steps):
            self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before any step)."""
        return float(self._acc.get_epsilon(delta=delta)) if len(self._acc) else 0.0


def make_accountant(name: str) -> RDPAccountant | OpacusAccountant:
    """`rdp` (built in) or `prv` (opacus)."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return OpacusAccountant("prv")
    raise ValueError(f"privacy.accountant={name!r} is not rdp|prv")


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` steps at fixed settings."""
    acc = make_accountant(accountant)
    if steps > 0:
        acc.step(noise_multiplier, sample_rate, steps)
    return acc.epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to 0.1%) whose `steps` steps stay within `target_epsilon`."""
    lo, hi = 0.0, 1.0
    while epsilon_after(steps, hi, sample_rate, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"privacy.target_epsilon={target_epsilon} is out of reach for {steps} steps at "
                             f"sampling rate {sample_rate:.3g}; raise it or train fewer steps")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon_after(steps, mid, sample_rate, delta, accountant) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def max_steps_within(target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                     limit: int, accountant: str = "rdp") -> int:
    """The most steps (<= limit) whose epsilon stays within `target_epsilon` (epsilon grows with steps)."""
    if epsilon_after(limit, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
        return limit
    lo, hi = 0, limit  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
