"""The quality metrics behave as their definitions say.

Each metric is checked against an independent formulation on the same inputs: the Fréchet distance against
scipy's general matrix square root and against closed forms (features built to have exactly the wanted sample
mean and covariance), precision and recall against a brute-force reference and against hand-made point sets
whose answers are worked out below.
"""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from vaegan_fast.metrics import frechet_distance, precision_recall


# ------------------------------------------------------------------------------ independent formulations
def reference_frechet_distance(a, b) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), in numpy with scipy's general sqrtm (as in
    pytorch-fid), covariances with np.cov's unbiased (N - 1) normalisation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    cross = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(cross).real)


def reference_precision_recall(real, fake, k: int = 3) -> tuple:
    """Kynkäänniemi et al. (2019), by brute force in float64: the radius of a point is the distance to its
    k-th nearest *other* point of its own set; a query counts if it lies in at least one closed ball."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)

    def radii(points):
        out = np.empty(len(points))
        for i, p in enumerate(points):
            others = np.delete(points, i, axis=0)
            out[i] = np.sort(np.linalg.norm(others - p, axis=1))[k - 1]
        return out

    def share_inside(queries, centres, centre_radii):
        return float(np.mean([np.any(np.linalg.norm(centres - q, axis=1) <= centre_radii) for q in queries]))

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def with_moments(n: int, mean, cov, seed: int = 0) -> torch.Tensor:
    """n float64 rows whose sample mean is exactly ``mean`` and unbiased sample covariance exactly ``cov``:
    Gaussian draws, centred, whitened by the Cholesky factor of their own covariance, re-coloured."""
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    x = torch.randn(n, len(mean), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(0)
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(x.T @ x / (n - 1)), x.T, upper=False).T
    out = white @ torch.linalg.cholesky(cov).T + mean
    assert torch.allclose(out.mean(0), mean, atol=1e-12)
    assert torch.allclose(torch.cov(out.T).reshape(cov.shape), cov, atol=1e-10)
    return out


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


# ------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_of_a_set_against_itself_is_zero():
    x = torch.randn(500, 16, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    x = torch.randn(400, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    for size in (0.1, 1.0, 3.0):
        shift = torch.full((8,), size, dtype=torch.float64)
        assert frechet_distance(x, x + shift) == pytest.approx(8 * size**2, rel=1e-7)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    var_a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    var_b = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    a = with_moments(300, [0.0, 0.0, 0.0], torch.diag(var_a), seed=1)
    b = with_moments(250, [1.0, 0.0, -1.0], torch.diag(var_b), seed=2)
    expected = 2.0 + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_commuting_full_covariances():
    # S_a = Q diag(a) Q^T and S_b = Q diag(b) Q^T share eigenvectors (neither is diagonal):
    # FD = |m_a - m_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    q = random_rotation(5, seed=3)
    eig_a = torch.tensor([0.1, 0.5, 1.0, 3.0, 9.0], dtype=torch.float64)
    eig_b = torch.tensor([4.0, 0.5, 2.0, 0.2, 1.0], dtype=torch.float64)
    mean_a = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    mean_b = torch.tensor([1.0, 1.0, 0.0, -0.5, 3.0], dtype=torch.float64)
    cov_a, cov_b = q @ torch.diag(eig_a) @ q.T, q @ torch.diag(eig_b) @ q.T
    assert (cov_a - torch.diag(cov_a.diagonal())).abs().max() > 0.1  # really non-diagonal
    a, b = with_moments(400, mean_a, cov_a, seed=4), with_moments(350, mean_b, cov_b, seed=5)
    expected = ((mean_a - mean_b) ** 2).sum() + ((eig_a.sqrt() - eig_b.sqrt()) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("cov_a, cov_b, shift", [
    ([[2.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 4.0]], [1.0, -2.0]),
    ([[1.0, 0.9], [0.9, 1.0]], [[3.0, -1.0], [-1.0, 0.5]], [0.0, 0.0]),
    ([[5.0, 2.0], [2.0, 1.0]], [[0.2, 0.1], [0.1, 4.0]], [-3.0, 0.5]),
])
def test_frechet_distance_matches_the_closed_form_for_non_commuting_2d_covariances(cov_a, cov_b, shift):
    # The eigenvalues of S_a^1/2 S_b S_a^1/2 are those of S_a S_b, and a 2x2 PSD matrix M has
    # tr(sqrt(M)) = sqrt(tr(M) + 2 sqrt(det M)); det(S_a S_b) = det(S_a) det(S_b).
    (a11, a12), (_, a22) = cov_a
    (b11, b12), (_, b22) = cov_b
    assert a12 * (b11 - b22) != b12 * (a11 - a22)  # the two covariances do not commute
    tr_ab = a11 * b11 + 2 * a12 * b12 + a22 * b22
    det_ab = (a11 * a22 - a12**2) * (b11 * b22 - b12**2)
    expected = shift[0] ** 2 + shift[1] ** 2 + a11 + a22 + b11 + b22 - 2 * math.sqrt(tr_ab + 2 * math.sqrt(det_ab))
    a = with_moments(200, [0.0, 0.0], cov_a, seed=6)
    b = with_moments(300, shift, cov_b, seed=7)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(reference_frechet_distance(a, b), rel=1e-9)


def test_frechet_distance_of_the_first_worked_case_is_its_hand_computed_value():
    # S_a = [[2, 1], [1, 2]], S_b = diag(1, 4), shift (1, -2): 5 + 4 + 5 - 2 sqrt(10 + 2 sqrt(12)).
    a = with_moments(100, [0.0, 0.0], [[2.0, 1.0], [1.0, 2.0]], seed=8)
    b = with_moments(100, [1.0, -2.0], [[1.0, 0.0], [0.0, 4.0]], seed=9)
    assert frechet_distance(a, b) == pytest.approx(5.771220447654342, rel=1e-9)


@pytest.mark.parametrize("dim, rows_a, rows_b", [(2, 50, 80), (7, 300, 200), (64, 1000, 700)])
def test_frechet_distance_matches_scipy_sqrtm_on_correlated_features(dim, rows_a, rows_b):
    mix_a, mix_b = torch.randn(dim, dim, dtype=torch.float64), torch.randn(dim, dim, dtype=torch.float64)
    a = torch.randn(rows_a, dim, dtype=torch.float64) @ mix_a + torch.randn(dim, dtype=torch.float64)
    b = torch.randn(rows_b, dim, dtype=torch.float64) @ (0.5 * mix_a + mix_b) + 2.0
    expected = reference_frechet_distance(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    # float32 features (what the classifier gives) are handled in float64 the same way
    a32, b32 = a.float(), b.float()
    assert frechet_distance(a32, b32) == pytest.approx(reference_frechet_distance(a32, b32), rel=1e-7)


def test_frechet_distance_of_non_negative_features_with_dead_units_matches_scipy():
    # Like ReLU features with units that never fire: singular covariances.
    a = torch.relu(torch.randn(600, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64))
    b = torch.relu(torch.randn(500, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64) + 0.5)
    a[:, :4] = 0.0
    b[:, :4] = 0.0
    live = reference_frechet_distance(a[:, 4:], b[:, 4:])
    assert frechet_distance(a, b) == pytest.approx(live, rel=1e-7)
    b[:, 0] = 3.0  # a dead unit that is constant but not equal across the sets adds its squared offset
    assert frechet_distance(a, b) == pytest.approx(live + 9.0, rel=1e-7)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


# ------------------------------------------------------------------------------ precision and recall
def _column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


def test_precision_and_recall_of_hand_made_sets_with_each_k():
    # 1-D. real = {0, 1, 2, 3}: distances to the others are 0:{1,2,3}, 1:{1,1,2}, 2:{1,1,2}, 3:{1,2,3}, so
    # the radii are k=1: (1,1,1,1), k=2: (2,1,1,2), k=3: (3,2,2,3) and the real manifold is
    # k=1: [-1, 4], k=2: [-2, 5], k=3: [-3, 6].
    # fake = {4.5, 5.5, 10, 11, 13}: sorted distances to the others are
    # 4.5:(1, 5.5, 6.5, 8.5)  5.5:(1, 4.5, 5.5, 7.5)  10:(1, 3, 4.5, 5.5)  11:(1, 2, 5.5, 6.5)  13:(2, 3, 7.5, 8.5)
    # so with k=1 the fake balls are [3.5,5.5] [4.5,6.5] [9,11] [10,12] [11,15] (no real point inside), with
    # k=2 [-1,10] [1,10] [7,13] [9,13] [10,16] (all of 0..3 inside), with k=3 [-2,11] ... (all inside).
    # precision = fake points in the real manifold: k=1: none, k=2: {4.5}, k=3: {4.5, 5.5}.
    real, fake = _column([0, 1, 2, 3]), _column([4.5, 5.5, 10, 11, 13])
    expected = {1: (0.0, 0.0), 2: (0.2, 1.0), 3: (0.4, 1.0)}
    for k, (precision, recall) in expected.items():
        got_p, got_r = precision_recall(real, fake, k=k)
        assert got_p == pytest.approx(precision, abs=1e-7), f"precision with k={k}"
        assert got_r == pytest.approx(recall, abs=1e-7), f"recall with k={k}"
        assert reference_precision_recall(real, fake, k) == pytest.approx((precision, recall), abs=1e-12)
    # the roles swap with the arguments: real <-> fake swaps precision <-> recall
    assert precision_recall(fake, real, k=2) == pytest.approx((1.0, 0.2), abs=1e-7)


def test_precision_and_recall_use_closed_balls():
    # real = {0, 1, 3}, k=1: radii (1, 1, 2), real manifold [-1, 5]; fake 5 is on its boundary, 6 outside.
    # fake = {5, 6}, k=1: radii (1, 1), balls [4, 6] and [5, 7]: no real point inside.
    precision, recall = precision_recall(_column([0, 1, 3]), _column([5, 6]), k=1)
    assert precision == 0.5 and recall == 0.0


def test_precision_and_recall_of_duplicated_points():
    # Three copies each of 0 and 10. With k=2 the radius of a copy is the distance to another copy, 0 (a
    # point's own zero distance is skipped, a duplicate's is not), so only 0 and 10 themselves are inside;
    # with k=3 the third other point is 10 away, and the balls cover [-10, 20].
    real = _column([0, 0, 0, 10, 10, 10])
    fake = _column([0, 0.5, 0.5, 10, 25])
    assert precision_recall(real, fake, k=2)[0] == pytest.approx(0.4, abs=1e-7)
    assert precision_recall(real, fake, k=3)[0] == pytest.approx(0.8, abs=1e-7)
    assert reference_precision_recall(real, fake, 2)[0] == pytest.approx(0.4)
    assert reference_precision_recall(real, fake, 3)[0] == pytest.approx(0.8)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dim", [2, 8])
def test_precision_and_recall_match_a_brute_force_reference(k, dim):
    # Two overlapping clouds of different spread and size, so that precision and recall differ and both
    # depend on the radii.
    real = torch.randn(150, dim)
    fake = torch.randn(200, dim) * 1.5 + 1.0
    precision, recall = precision_recall(real, fake, k=k)
    ref_precision, ref_recall = reference_precision_recall(real, fake, k)
    assert 0.05 < ref_precision < 0.95 and abs(ref_recall - ref_precision) > 0.05
    # within one point (a distance within float32 round-off of a radius may fall either way)
    assert precision == pytest.approx(ref_precision, abs=1.01 / 200)
    assert recall == pytest.approx(ref_recall, abs=1.01 / 150)
    # the chunked computation gives the same answer as one chunk
    assert precision_recall(real, fake, k=k, chunk=17) == (precision, recall)


def test_precision_and_recall_separate_realism_from_coverage():
    real = torch.randn(2000, 2)
    precision, recall = precision_recall(real, torch.randn(2000, 2))  # the same distribution
    assert precision > 0.9 and recall > 0.9
    collapsed = torch.randn(2000, 2) * 0.05  # realistic points, but all in one spot
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.1
    spread = torch.randn(2000, 2) * 3.0  # covers the data, but many points are unrealistic
    precision, recall = precision_recall(real, spread)
    assert precision < 0.7 and recall > 0.9
    far = torch.randn(2000, 2) + 10.0  # nothing realistic
    assert precision_recall(real, far) == (0.0, 0.0)


def test_precision_and_recall_reject_too_few_points():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
