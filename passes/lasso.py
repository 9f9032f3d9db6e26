"""LASSO channel selection with least-squares reconstruction (He et al., 2017)."""
from __future__ import annotations

import numpy as np

from prunec.passes.base import register_pass
from prunec.passes.thinet import LeastSquaresSelection, Reconstruction


def lasso_gram(gram: np.ndarray, cross: np.ndarray, lam: float, beta: np.ndarray | None = None,
               sweeps: int = 200, tol: float = 1e-9) -> np.ndarray:
    """argmin_β ½ βᵀGβ − cᵀβ + λ‖β‖₁ by cyclic coordinate descent (G = ZZᵀ, c = ZY).
    This is ½‖Y − Σ_u β_u Z_u‖² + λ‖β‖₁ up to a constant."""
    n = len(cross)
    beta = np.ones(n) if beta is None else beta.copy()
    diag = np.maximum(np.diag(gram), 1e-12)
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(n):
            rho = cross[j] - gram[j] @ beta + diag[j] * beta[j]
            new = np.sign(rho) * max(abs(rho) - lam, 0.0) / diag[j]
            biggest = max(biggest, abs(new - beta[j]))
            beta[j] = new
        if biggest < tol:
            break
    return beta


def lasso_keep(gram: np.ndarray, cross: np.ndarray, n_keep: int, steps: int = 40) -> np.ndarray:
    """Bisect λ (log scale) until exactly ``n_keep`` coefficients are non-zero; units ranked by
    |β| at the closest λ found (ties broken by the smaller λ's coefficients)."""
    lo, hi = 1e-12, float(np.abs(cross).max()) + 1e-12   # λ ≥ max|c| zeroes every β
    best, beta = None, np.ones(len(cross))
    for _ in range(steps):
        mid = float(np.sqrt(lo * hi))
        beta = lasso_gram(gram, cross, mid, beta)
        nnz = int(np.count_nonzero(beta))
        if best is None or abs(nnz - n_keep) < abs(np.count_nonzero(best) - n_keep) or nnz == n_keep:
            best = beta.copy()
        if nnz == n_keep:
            break
        lo, hi = (mid, hi) if nnz > n_keep else (lo, mid)
    return np.sort(np.argsort(-np.abs(best), kind="stable")[:n_keep])


@register_pass("lasso")
class Lasso(LeastSquaresSelection):
    """Select channels by LASSO regression on their contributions to the consumers' outputs,
    min_β ‖Y − Σ_c β_c X_c W_cᵀ‖² + λ‖β‖₁ with λ bisected to hit the channel count, then refit
    the consumer weights by least squares on the kept channels (He et al., 2017).
    Before: conv1(64) → relu → conv2(in=64)
    After:  plan keeps 32 of conv1's channels; state.updates[conv2.weight] (in=32), refit."""

    def choose(self, rec: Reconstruction, n_keep: int) -> np.ndarray:
        return lasso_keep(rec.gram, rec.cross, n_keep)
