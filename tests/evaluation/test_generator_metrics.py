import json

import dreamdata_cli
from training.generator_metrics import MetricsSettings, measure_generator

ROW_KEYS = {"images", "frechet_distance", "precision", "recall", "density", "coverage", "class_fidelity"}


def test_metrics_end_to_end_caches_the_feature_classifier(data_tar, tiny_checkpoint, cache_dir, capsys):
    s = MetricsSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), n_per_class=3, steps=2, k=2,
                        feature_width=4, feature_epochs=2, device="cpu", cache_dir=str(cache_dir))
    first = measure_generator(s, show_bars=False)
    assert set(first["rows"]) == {"generated", "real_train"}
    for row in first["rows"].values():
        assert set(row) == ROW_KEYS and row["images"] == 30
        assert row["frechet_distance"] >= 0
        assert all(0 <= row[k] <= 1 for k in ("precision", "recall", "coverage"))
        assert set(row["class_fidelity"]["per_class"]) == set(first["feature_classifier"]["class_names"])
    clf = first["feature_classifier"]
    assert clf["reused"] is False and 0 <= clf["test_accuracy"] <= 1
    assert (cache_dir / "feature-classifier").is_dir()
    assert list((cache_dir / "feature-classifier").glob("*/classifier.safetensors"))

    dreamdata_cli.main(["metrics", "--checkpoint", str(tiny_checkpoint), "--data", str(data_tar), "--n-per-class", "3",
                        "--steps", "2", "--k", "2", "--feature-width", "4", "--feature-epochs", "2",
                        "--device", "cpu", "--cache-dir", str(cache_dir)])
    second = json.loads(capsys.readouterr().out)
    assert second["feature_classifier"]["reused"] is True and second["synthetic"]["reused"] is True
    # the cached classifier reloads exactly: same features, same numbers
    assert second["rows"] == json.loads(json.dumps(first["rows"]))


def test_inception_frechet_distance_is_added_and_the_test_statistics_cached(
        data_tar, tiny_checkpoint, cache_dir, tmp_path, monkeypatch):
    import training.generator_metrics as gm

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in: load_inception is replaced below")
    seen = []

    def fake_features(model, images, device="cpu", batch_size=100):  # a cheap stand-in for pool3 features
        seen.append(len(images))
        return images.float().flatten(1)[:, :6]

    monkeypatch.setattr(gm, "load_inception", lambda path, device="cpu": object())
    monkeypatch.setattr(gm, "inception_features", fake_features)
    s = MetricsSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), n_per_class=3, steps=2, k=2,
                        feature_width=4, feature_epochs=1, inception_weights=str(weights), device="cpu",
                        cache_dir=str(cache_dir))
    first = measure_generator(s, show_bars=False)
    assert seen == [40, 30, 30]  # test split, generated, real_train
    assert all(row["frechet_distance_inception"] >= 0 for row in first["rows"].values())
    assert "frechet_distance_inception" in first["notes"]
    second = measure_generator(s, show_bars=False)
    assert seen[3:] == [30, 30]  # test statistics came from the cache
    assert second["rows"]["generated"]["frechet_distance_inception"] == \
        first["rows"]["generated"]["frechet_distance_inception"]


def test_bad_metrics_input_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Found wrong only after the feature classifier trained and the images were sampled, these cost hours."""
    import pytest

    import training.generator_metrics as gm

    monkeypatch.setattr(gm, "load_dataset", lambda *a, **k: pytest.fail("the data set was loaded"))
    base = ["metrics", "--data", str(tmp_path / "data.tar.gz"), "--n-per-class", "10"]
    for extra, expected in [(["--k", "0"], "--k must be at least 1, got 0"),
                            (["--inception-weights", str(tmp_path / "nope.pt")], "inception weights not found"),
                            (["--out", str(tmp_path)], "is a folder"), (["--steps", "0"], "steps=0 out of range"),
                            (["--sampler", "dpmpp", "--eta", "0.5"], "ddim sampler only"),
                            (["--batch-size", "0"], "--batch-size must be at least 1"),
                            (["--feature-width", "1"], "--feature-width must be at least 2"),
                            (["--seed", "-1"], "--seed must be in 0..2147483647, got -1")]:
        with pytest.raises(SystemExit) as e:
            dreamdata_cli.main(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and "Traceback" not in err, (extra, err)


def test_a_knn_reference_smaller_than_the_generated_set_is_said(data_tar, tiny_checkpoint, cache_dir):
    """More images per class than the test split holds: the k-NN reference is all of them, and the note says
    the two sides differ (precision and recall of unequal sets read otherwise)."""
    from tests.evaluation.conftest import TEST_PER_CLASS

    s = MetricsSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), n_per_class=TEST_PER_CLASS + 1, steps=2,
                        k=2, feature_width=4, feature_epochs=1, device="cpu", cache_dir=str(cache_dir))
    out = measure_generator(s, show_bars=False)
    assert out["rows"]["generated"]["images"] == 10 * (TEST_PER_CLASS + 1)
    assert f"against {10 * TEST_PER_CLASS} real test images, fewer than the" in out["notes"]["knn"]
