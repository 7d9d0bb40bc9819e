
import pytest
import torch

from training.features_metrics import (class_fidelity, density_coverage, feature_stats, frechet_distance,
                                       frechet_distance_from_stats, frechet_distance_infinity, inception_features,
                                       knn_radii, load_inception, paired_bootstrap, precision_recall)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # d^2 = ||mu1 - mu2||^2 + sum_i (s1_i - s2_i)^2 when both covariances are diagonal
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = float((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum())
    got = frechet_distance_from_stats(mu1, torch.diag(s1 ** 2), mu2, torch.diag(s2 ** 2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_sampled_gaussians_approaches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 2, generator=g, dtype=torch.float64) + torch.tensor([3.0, 0.0], dtype=torch.float64)
    # closed form: 3^2 + 2 * (1 - 2)^2 = 11
    assert frechet_distance(a, b) == pytest.approx(11.0, rel=0.03)


def test_feature_stats_shapes_and_validation():
    mu, sigma = feature_stats(torch.randn(10, 3))
    assert mu.shape == (3,) and sigma.shape == (3, 3) and mu.dtype == torch.float64
    with pytest.raises(ValueError):
        feature_stats(torch.randn(1, 3))


def test_knn_radii_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ValueError):
        knn_radii(x, 4)


def test_identical_sets_have_full_precision_recall_and_coverage():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    pr, dc = precision_recall(x, x, k=5), density_coverage(x, x, k=5)
    assert pr == {"precision": 1.0, "recall": 1.0}
    assert dc["coverage"] == 1.0
    # each real ball holds its centre and its k neighbours: density = (k + 1) / k
    assert dc["density"] == pytest.approx(6 / 5)


def test_disjoint_sets_score_zero():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 100
    assert precision_recall(real, fake, k=3) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(real, fake, k=3) == {"density": 0.0, "coverage": 0.0}


def test_precision_counts_the_share_of_generated_points_on_the_real_manifold():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g)
    fake = torch.cat([real[:100], torch.randn(100, 4, generator=g) + 50])  # half on, half far off
    assert precision_recall(real, fake, k=3)["precision"] == pytest.approx(0.5)


def test_recall_counts_the_share_of_real_points_the_generator_covers():
    g = torch.Generator().manual_seed(0)
    mode_a, mode_b = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50
    real = torch.cat([mode_a, mode_b])
    pr = precision_recall(real, mode_a, k=3)  # a generator that dropped mode b
    assert pr == {"precision": 1.0, "recall": 0.5}
    assert density_coverage(real, mode_a, k=3)["coverage"] == pytest.approx(0.5)


def test_class_fidelity_overall_and_per_class():
    requested = torch.tensor([0, 0, 0, 0, 1, 1])
    predicted = torch.tensor([0, 0, 1, 0, 1, 0])
    out = class_fidelity(predicted, requested, ["a", "b", "c"])
    assert out["overall"] == pytest.approx(4 / 6)
    assert out["per_class"] == {"a": 0.75, "b": 0.5, "c": None}


def test_inception_loads_a_user_state_dict_and_gives_pool3_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    model = load_inception(path)
    feats = inception_features(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()

    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="inception_v3"):
        load_inception(bad)
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.pth")


def test_paired_bootstrap_of_a_set_against_itself_is_exactly_zero():
    g = torch.Generator().manual_seed(0)
    f, ref = torch.randn(60, 4, generator=g), torch.randn(300, 4, generator=g)
    correct = torch.rand(60, generator=g) < 0.5
    out = paired_bootstrap(f, correct, f, correct, feature_stats(ref), n_boot=50)
    assert out["frechet_distance"] == pytest.approx([0, 0, 0], abs=1e-9)
    assert out["class_fidelity"] == [0, 0, 0] and out["images"] == 60 and out["n_boot"] == 50


def test_paired_bootstrap_intervals_hold_the_estimates_and_see_a_real_difference():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200, 3, generator=g, dtype=torch.float64)
    a = b + torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64)  # the same images, shifted: a is worse
    ca, cb = torch.ones(200, dtype=torch.bool), torch.arange(200) % 4 == 0  # fidelity 1.0 vs 0.25
    out = paired_bootstrap(a, ca, b, cb, feature_stats(ref), n_boot=200)
    est, lo, hi = out["frechet_distance"]
    assert est == pytest.approx(frechet_distance(ref, a) - frechet_distance(ref, b), rel=1e-6)
    assert 0 < lo <= est <= hi
    rel = out["frechet_distance_relative"]
    assert rel[0] == pytest.approx(frechet_distance(ref, a) / frechet_distance(ref, b) - 1, rel=1e-6)
    assert rel[1] > 0
    fid = out["class_fidelity"]
    assert fid[0] == pytest.approx(0.75) and 0.6 < fid[1] <= 0.75 <= fid[2] < 0.9
    # the same seed gives the same intervals
    assert paired_bootstrap(a, ca, b, cb, feature_stats(ref), n_boot=200) == out


def test_paired_bootstrap_fd_intervals_are_moved_onto_their_estimates():
    """With fewer images than features, resamples' repeated images pull their FD difference far toward 0, and
    a plain percentile interval missed its own estimate (benchmarks/fd_interval_coverage.py counts how often)."""
    g = torch.Generator().manual_seed(3)
    d, n = 24, 16
    ref = torch.randn(2000, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = 1.15 * z + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.25
    b = 1.10 * z + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.20
    ones = torch.ones(n, dtype=torch.bool)
    out = paired_bootstrap(a, ones, b, ones, feature_stats(ref), n_boot=300)
    for name in ("frechet_distance", "frechet_distance_relative"):
        est, lo, hi = out[name]
        assert lo < est < hi, (name, out[name])
    # the same resamples (seed 0), one distance at a time: the percentile interval, moved by estimate - mean
    idx = torch.randint(n, (300, n), generator=torch.Generator().manual_seed(0))
    mu, s = feature_stats(ref)

    def fds(f):
        return torch.tensor([frechet_distance_from_stats(mu, s, *feature_stats(f[i])) for i in idx],
                            dtype=torch.float64)

    x, y = fds(a), fds(b)
    for name, v in (("frechet_distance", x - y), ("frechet_distance_relative", x / y - 1)):
        est = out[name][0]
        lo, hi = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        moved = est - v.mean().item()
        if name == "frechet_distance_relative":  # there the resamples' bias is no rounding error
            assert abs(moved) > 0.1 * (hi - lo)
        assert out[name][1:] == pytest.approx([lo + moved, hi + moved], rel=1e-6, abs=1e-9)


def test_fd_infinity_removes_the_few_images_bias():
    """Generated N(0.3, 1.2^2 I) against a real N(0, I) in 32 features: the distance with infinitely many images is
    32 x (0.09 + (1.2 - 1)^2) = 4.16; 200 images read far more, their extrapolation about that."""
    d, n = 32, 200
    ref = (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    exact = d * (0.09 + 0.2 ** 2)
    plain, inf = [], []
    for seed in range(4):  # four draws of 200 images: the bias is what they share, not their noise
        fake = 0.3 + 1.2 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        plain.append(frechet_distance_from_stats(*ref, *feature_stats(fake)))
        inf.append(frechet_distance_infinity(fake, ref))
    bias = sum(plain) / 4 - exact
    assert bias > 1.0  # about +1.8 here
    assert abs(sum(inf) / 4 - exact) < 0.2 * bias
    assert frechet_distance_infinity(fake, ref) == inf[-1]  # seeded
    with pytest.raises(ValueError, match="3x the 32 features"):
        frechet_distance_infinity(fake[:150], ref)
    with pytest.raises(ValueError, match="two subset sizes"):
        frechet_distance_infinity(fake, ref, fractions=(1.0,))


def test_paired_bootstrap_validates_its_inputs():
    f, c = torch.randn(5, 2), torch.ones(5, dtype=torch.bool)
    stats = feature_stats(torch.randn(20, 2))
    with pytest.raises(ValueError, match="same size"):
        paired_bootstrap(f, c, f[:4], c[:4], stats)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(f, c, f, c, stats, n_boot=0)
