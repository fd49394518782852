"""Exactly mergeable float64 running statistics and PCA denoising: pure maths, no I/O."""

from __future__ import annotations

import torch

F64 = torch.float64


class RunningMean:
    """Float64 sums and counts per label; `merge` of shards equals one pass over all data."""

    def __init__(self, n_labels: int, shape: tuple[int, ...]) -> None:
        self.sums = torch.zeros((n_labels, *shape), dtype=F64)
        self.counts = torch.zeros(n_labels, dtype=F64)

    def update(self, labels: torch.Tensor, values: torch.Tensor) -> None:
        """Add `values[i]` to the running sum of label `labels[i]`."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.sums.index_add_(0, labels, values.detach().to("cpu", F64))
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=F64))

    def merge(self, other: RunningMean) -> RunningMean:
        self.sums += other.sums
        self.counts += other.counts
        return self

    def mean(self) -> torch.Tensor:
        """Per-label means; labels never seen are NaN."""
        shape = (-1,) + (1,) * (self.sums.dim() - 1)
        return self.sums / self.counts.reshape(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> RunningMean:
        stats = cls(0, ())
        stats.sums, stats.counts = state["sums"].to(F64), state["counts"].to(F64)
        return stats


class RunningCovariance:
    """Float64 count, sum and sum of outer products of row vectors, one set per group."""

    def __init__(self, groups: int, width: int, device: str | torch.device = "cpu") -> None:
        self.n = torch.zeros(groups, dtype=F64, device=device)
        self.sum = torch.zeros(groups, width, dtype=F64, device=device)
        self.outer = torch.zeros(groups, width, width, dtype=F64, device=device)

    def update(self, group: int, rows: torch.Tensor) -> None:
        """Add the rows [n, width] of one group (on the statistics' device, in float64)."""
        x = rows.detach().to(self.sum.device, F64)
        self.n[group] += x.shape[0]
        self.sum[group] += x.sum(0)
        self.outer[group] += x.T @ x

    def merge(self, other: RunningCovariance) -> RunningCovariance:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    def mean(self) -> torch.Tensor:
        return self.sum / self.n[:, None]

    def covariance(self) -> torch.Tensor:
        """Population covariance per group, [groups, width, width]."""
        mean = self.mean()
        return self.outer / self.n[:, None, None] - mean[:, :, None] * mean[:, None, :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> RunningCovariance:
        stats = cls(0, 0)
        stats.n, stats.sum, stats.outer = (state[k].to(F64) for k in ("n", "sum", "outer"))
        return stats


def principal_components(cov: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal directions [k, d] that together explain at least `fraction` of the variance.

    k is the smallest count whose cumulative explained ratio reaches `fraction`; also returns
    the explained-variance ratio of every component, in decreasing order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"variance fraction must be in [0, 1], got {fraction}")
    values, vectors = torch.linalg.eigh(cov.to(F64))
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    ratio = values / values.sum()
    if fraction == 0.0:
        return vectors[:, :0].T, ratio
    k = int(torch.searchsorted(ratio.cumsum(0), torch.tensor(fraction, dtype=F64) - 1e-12)) + 1
    return vectors[:, : min(k, len(values))].T.contiguous(), ratio


def project_out(vectors: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """Remove the span of orthonormal `components` [k, d] from `vectors` [..., d]."""
    components = components.to(vectors.dtype)
    return vectors - (vectors @ components.T) @ components


def logistic_directions(
    features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3,
    iterations: int = 200,
) -> torch.Tensor:  # fmt: skip
    """One-vs-rest logistic-regression weight vectors [classes, d] (float64), fitted jointly by
    L-BFGS on the mean class-balanced logistic loss plus `l2`/2 times the squared weights.

    Features are scaled by their overall standard deviation for the fit and the weights
    mapped back, so `l2` does not depend on the activations' scale. Each class's positives
    and negatives weigh half of its loss each.
    """
    x = features.to(F64)
    scale = x.std().clamp(min=1e-12)
    x = x / scale
    y = torch.zeros(len(labels), classes, dtype=F64)
    y[torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)] = 1.0
    positives = y.sum(0).clamp(min=1)
    weight = y / (2 * positives) + (1 - y) / (2 * (len(labels) - positives).clamp(min=1))
    w = torch.zeros(x.shape[1] + 1, classes, dtype=F64, requires_grad=True)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = design @ w
        value = (weight * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, reduction="none")).sum() / classes + 0.5 * l2 * (w[:-1] ** 2).sum()  # fmt: skip
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return (w[:-1].detach() / scale).T.contiguous()
