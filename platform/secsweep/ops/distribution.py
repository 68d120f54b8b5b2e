"""Distances between two sets of embeddings (two empirical distributions), differentiable.

Used by DRUPE (trainables/attacks/drupe.py; docs/methods.md, "DRUPE"), whose extra loss term keeps
the embeddings of triggered inputs distributed like clean ones, and by its tests and monitors, which
measure the same closeness with both distances below (one is the training loss, the other is not,
so a victim cannot look close only under the distance it was trained on).

* Sliced Wasserstein distance (SWD): project both sets on `n_projections` random unit directions
  and compare the sorted projections (the 1-D optimal transport) at common quantile levels:
      SWD_p(a, b) = ( mean_{theta, q} |Q_a^theta(q) - Q_b^theta(q)|^p )^(1/p),
  q = (k + 1/2) / m, k = 0..m-1, m = min(|a|, |b|), quantiles by linear interpolation of the
  sorted projections, so sets of different sizes are compared without resampling. Units: those
  of the embeddings. Cost O(K (N log N) D).
* Maximum mean discrepancy (MMD^2) with a sum of Gaussian kernels
  k(u, v) = sum_s exp(-|u - v|^2 / (2 s^2 h^2)), h^2 the median squared distance of the pooled
  sets (the median heuristic, no gradient) and s in `scales`; the unbiased U-statistic by default
  (can be slightly negative when the sets agree), the biased V-statistic (>= 0) with
  `unbiased=False`. Unit-free (a sum of kernel means).

Both are symmetric in (a, b) and scale with the embeddings (SWD linearly; MMD is invariant to a
common scale through the median heuristic). Pure tensor code: (N, D) and (M, D) float tensors in,
a scalar tensor out; gradient flows to both inputs.
"""

from __future__ import annotations

import torch

__all__ = ["SWD_PROJECTIONS", "MMD_SCALES", "sliced_wasserstein", "mmd2", "DISTANCES", "distance"]

SWD_PROJECTIONS = 64               # random directions per call (a choice: the estimate's noise ~ 1/sqrt(K))
MMD_SCALES = (0.5, 1.0, 2.0)       # kernel widths as multiples of the median distance (a choice)
DISTANCES = ("swd", "mmd")


def _check(a: torch.Tensor, b: torch.Tensor, min_rows: int = 1) -> None:
    for name, z in (("a", a), ("b", b)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] < min_rows:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{name} shape={shape}: must be an (N, D) tensor with N >= {min_rows}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b dim={b.shape[1]}: must equal a dim={a.shape[1]}")


def _quantiles(sorted_cols: torch.Tensor, m: int) -> torch.Tensor:
    """(m, K) quantiles at levels (k + 1/2)/m of the columns of `sorted_cols` (N, K), by linear
    interpolation between order statistics (position q * N - 1/2), differentiable."""
    n = sorted_cols.shape[0]
    levels = (torch.arange(m, device=sorted_cols.device, dtype=sorted_cols.dtype) + 0.5) / m
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.to(pos.dtype))[:, None]
    return sorted_cols[lo] * (1 - w) + sorted_cols[hi] * w


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, n_projections: int = SWD_PROJECTIONS, p: int = 2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """SWD_p between the rows of `a` (N, D) and `b` (M, D) (module docstring).

    The directions are drawn from `generator` (a CPU generator; fresh directions each call make
    the training signal cover every direction over the steps); fix the generator's seed to
    compare two pairs of sets on the same directions.
    """
    _check(a, b)
    if n_projections < 1:
        raise ValueError(f"n_projections={n_projections}: must be >= 1")
    if p < 1:
        raise ValueError(f"p={p}: must be >= 1")
    d = a.shape[1]
    theta = torch.randn(d, n_projections, generator=generator, dtype=torch.float32)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(device=a.device, dtype=a.dtype)
    pa, _ = (a @ theta).sort(dim=0)
    pb, _ = (b.to(a.dtype) @ theta).sort(dim=0)
    m = min(len(a), len(b))
    qa, qb = _quantiles(pa, m), _quantiles(pb, m)
    return (qa - qb).abs().pow(p).mean().pow(1.0 / p)


def mmd2(a: torch.Tensor, b: torch.Tensor, *, scales: tuple[float, ...] = MMD_SCALES,
         unbiased: bool = True) -> torch.Tensor:
    """MMD^2 between the rows of `a` (N, D) and `b` (M, D), Gaussian kernels (module docstring).

    The unbiased estimate needs N, M >= 2 (it leaves out the diagonal)."""
    _check(a, b, min_rows=2 if unbiased else 1)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales={scales}: must be a non-empty tuple of widths > 0")
    b = b.to(a.dtype)
    pooled = torch.cat([a, b])
    d2 = torch.cdist(pooled, pooled).pow(2)
    n, m = len(a), len(b)
    with torch.no_grad():  # the bandwidth is a fixed scale of this batch, not something to optimise
        off = d2[~torch.eye(n + m, dtype=torch.bool, device=d2.device)]
        h2 = off.median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2.0 * s * s * h2)) for s in scales)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    if unbiased:
        saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    else:
        saa, sbb = kaa.mean(), kbb.mean()
    return saa + sbb - 2.0 * kab.mean()


def distance(name: str, a: torch.Tensor, b: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """`sliced_wasserstein` ("swd") or `mmd2` ("mmd") with their defaults."""
    if name == "swd":
        return sliced_wasserstein(a, b, generator=generator)
    if name == "mmd":
        return mmd2(a, b)
    raise ValueError(f"distance={name!r}: must be one of {', '.join(DISTANCES)}")
