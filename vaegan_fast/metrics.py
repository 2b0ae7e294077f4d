"""Sample-quality metrics in a feature space: Fréchet distance, and precision / recall of the samples.

Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017):
    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
computed in float64 through symmetric eigendecompositions (no general matrix square root, so no complex
round-off). With features from vaegan_fast's own Fashion-MNIST classifier this is "FID (Fashion-MNIST
classifier features)", not Inception FID: the numbers are comparable with each other, not with papers.

Precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of balls around its
points with radius the distance to their k-th nearest neighbour in the same set. Precision is the share of
generated points inside the real manifold (are samples realistic?), recall the share of real points inside
the generated manifold (do samples cover the data?).
"""
from __future__ import annotations

import torch


def _gaussian(features: torch.Tensor):
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two [N, F] feature sets."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features must be [N, F] with the same F, got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("each feature set needs at least two rows to estimate a covariance")
    mu_a, cov_a = _gaussian(features_a)
    mu_b, cov_b = _gaussian(features_b)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(fd.item(), 0.0)


def _kth_neighbour_radius(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start:start + chunk], points)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: each point's nearest neighbour is itself
    return torch.cat(radii)


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    hits = []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start:start + chunk], centres)
        hits.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple:
    """(precision, recall) of ``fake`` against ``real``, both [N, F] feature sets."""
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    real, fake = real.float(), fake.float()
    real_radii = _kth_neighbour_radius(real, k, chunk)
    fake_radii = _kth_neighbour_radius(fake, k, chunk)
    precision = _inside(fake, real, real_radii, chunk).float().mean().item()
    recall = _inside(real, fake, fake_radii, chunk).float().mean().item()
    return precision, recall
