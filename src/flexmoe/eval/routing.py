"""Routing statistics: which experts carry which domain's tokens, and a heatmap of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def routing_shares(model, windows, num_windows: int = 32, batch_size: int = 8,
                   expert_mask: torch.Tensor | None = None) -> np.ndarray:
    """Share of top-k assignments each expert received (all MoE layers pooled) -> `[E]`, sums to 1."""
    model.set_record_routing(True)
    counts = torch.zeros(model.cfg.num_experts, dtype=torch.float64)
    try:
        n = min(len(windows), num_windows)
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.stack([windows[i] for i in range(start, min(start + batch_size, n))]))
            out = model(batch[:, :-1], expert_mask)
            for r in out.routing:
                counts += torch.bincount(r.top_idx_TK.reshape(-1), minlength=model.cfg.num_experts).double()
    finally:
        model.set_record_routing(False)
    return (counts / counts.sum()).numpy()


def plot_heatmap(shares: dict[str, np.ndarray], expert_names: list[str], path: str | Path, title: str) -> Path:
    """Rows: eval domains; columns: experts; cells: share of that domain's tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(shares)
    data = np.stack([shares[d] for d in domains])
    fig, ax = plt.subplots(figsize=(1.2 * len(expert_names) + 2, 0.6 * len(domains) + 1.5))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(expert_names)), [f"expert {i}\n{n}" for i, n in enumerate(expert_names)])
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("expert (slot, owner's domain)")
    ax.set_ylabel("eval domain")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="w" if data[i, j] < 0.6 else "k")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of top-k assignments")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
