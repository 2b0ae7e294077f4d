"""The quality metrics behave as their definitions say."""
import pytest
import torch

from vaegan_fast.metrics import frechet_distance, precision_recall


def test_frechet_distance_of_a_set_against_itself_is_zero():
    x = torch.randn(500, 16, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    x = torch.randn(400, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    for size in (0.1, 1.0, 3.0):
        shift = torch.full((8,), size, dtype=torch.float64)
        assert frechet_distance(x, x + shift) == pytest.approx(8 * size**2, rel=1e-7)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    torch.manual_seed(0)
    n, var_a, var_b = 200_000, torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 1.0])
    a = torch.randn(n, 3, dtype=torch.float64) * var_a.sqrt()
    b = torch.randn(n, 3, dtype=torch.float64) * var_b.sqrt() + torch.tensor([1.0, 0.0, -1.0])
    expected = 2.0 + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


def test_precision_and_recall_separate_realism_from_coverage():
    real = torch.randn(2000, 2)
    assert precision_recall(real, torch.randn(2000, 2)) > (0.9, 0.9)
    collapsed = torch.randn(2000, 2) * 0.05  # realistic points, but all in one spot
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.3
    far = torch.randn(2000, 2) + 10.0  # nothing realistic
    assert precision_recall(real, far) == (0.0, 0.0)
