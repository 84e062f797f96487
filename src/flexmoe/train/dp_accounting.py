"""Privacy accounting of DP-SGD with opacus' accountants (extra `dp`): Renyi DP (`rdp`) and
privacy loss random variables (`prv`) of the Poisson-subsampled Gaussian mechanism, and noise
calibration with opacus' `get_noise_multiplier`.

The names below are flexmoe's (train/privacy.py and the tests use them); the numbers are
opacus': `epsilon_after(steps, sigma, q, delta, name)` is exactly what opacus' accountant of that
name reports after the same steps (tests/privacy/test_accounting.py). opacus stays an optional
dependency: every entry point that needs it says so in one line (`require_opacus`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

# opacus' RDPAccountant.DEFAULT_ALPHAS, spelled out so that importing this module needs no opacus
# (a test holds the two equal): fine steps below 11, integers up to 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

INSTALL_HINT = "pip install -e '.[dp]' (or pip install 'opacus>=1.5')"


def require_opacus(what: str = "privacy.enabled=true") -> None:
    """Raise a one-line ValueError unless opacus (the accountants) can be imported."""
    try:
        import opacus.accountants  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{what} needs opacus for its privacy accounting, and it is not installed: "
                         f"{INSTALL_HINT}") from e


# --- Renyi DP of the subsampled Gaussian mechanism (opacus.accountants.analysis.rdp) -------------

def rdp_sampled_gaussian(q: float, sigma: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Renyi DP of one step of the Gaussian mechanism (noise sigma x sensitivity) applied to a
    Poisson sample of rate q, at each order -> `[len(orders)]`; add over steps."""
    require_opacus("rdp_sampled_gaussian")
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=np.float64)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """Tightest (epsilon, order) for `delta` over the orders (opacus' conversion, Balle et al. 2020)."""
    require_opacus("epsilon_from_rdp")
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, order = get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp, dtype=np.float64), delta=delta)
    return max(float(eps), 0.0), float(order)


# --- accountants -----------------------------------------------------------------------------------

class OpacusAccountant:
    """One of opacus' accountants (`rdp`, `prv`) behind two methods: `step` (any number of steps
    at fixed settings) and `epsilon(delta)`."""

    def __init__(self, name: str = "prv"):
        if name not in ("rdp", "prv"):
            raise ValueError(f"privacy.accountant={name!r} is not rdp|prv")
        require_opacus(f"privacy.accountant={name}")
        from opacus.accountants import create_accountant

        self.name = name
        self._acc = create_accountant(name)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """opacus' record: (noise multiplier, sampling rate, steps), merged while settings repeat."""
        return self._acc.history

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Account for `num_steps` more steps at these settings (what opacus' `step` records
        after `num_steps` calls, without making them)."""
        if num_steps <= 0:
            return
        h = self._acc.history
        if h and h[-1][0] == noise_multiplier and h[-1][1] == sample_rate:
            h[-1] = (noise_multiplier, sample_rate, h[-1][2] + num_steps)
        else:
            h.append((noise_multiplier, sample_rate, num_steps))

    def epsilon(self, delta: float, **kwargs: Any) -> float:
        """Epsilon spent so far at `delta` (0 before any step)."""
        return float(self._acc.get_epsilon(delta=delta, **kwargs)) if len(self._acc) else 0.0


class RDPAccountant(OpacusAccountant):
    """opacus' RDP accountant (orders `DEFAULT_ORDERS`)."""

    def __init__(self):
        super().__init__("rdp")


def make_accountant(name: str) -> OpacusAccountant:
    """opacus' accountant `rdp` or `prv`; a one-line ValueError without opacus or for another name."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return OpacusAccountant("prv")
    raise ValueError(f"privacy.accountant={name!r} is not rdp|prv")


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` steps at fixed settings."""
    acc = make_accountant(accountant)
    acc.step(noise_multiplier, sample_rate, steps)
    return acc.epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose `steps` steps stay within `target_epsilon`: opacus'
    `get_noise_multiplier`, searched to 0.1% of the target epsilon."""
    make_accountant(accountant)  # the name and opacus checked, with flexmoe's messages
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the search tries sigmas far too large, whose optimum is the top order
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              epsilon_tolerance=1e-3 * target_epsilon))
    except ValueError as e:  # opacus: "The privacy budget is too low."
        raise ValueError(f"privacy.target_epsilon={target_epsilon} is out of reach for {steps} steps at "
                         f"sampling rate {sample_rate:.3g}; raise it or train fewer steps") from e


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
