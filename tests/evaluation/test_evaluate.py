import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import dreamdata_cli
from diffusion.spec import DEFAULT_SETTINGS
from training.data import LabelledImages
from training.evaluate import ARMS, EvaluationSettings, run_evaluation
from training.evaluate_cli import parse_seeds
from training.evaluation_stats import mean_std, paired_delta, t_quantile
from training.synthetic_cache import align_classes

TEST_PER_CLASS = 4  # conftest.TEST_PER_CLASS


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_paired_delta_on_known_numbers():
    d = paired_delta([0.40, 0.42, 0.44], [0.43, 0.44, 0.47])
    # differences 0.03, 0.02, 0.03: mean 0.026667, sd 0.0057735, half-width 4.302653 * sd / sqrt(3) = 0.0143422
    assert d["mean"] == pytest.approx(0.0266667, abs=1e-6)
    assert d["std"] == pytest.approx(0.0057735, abs=1e-6)
    assert d["ci95"] == pytest.approx([0.0123245, 0.0410088], abs=1e-6)
    assert d["significant"] is True and d["n"] == 3
    spread = paired_delta([0.4, 0.5], [0.45, 0.45])  # +0.05, -0.05: the interval straddles 0
    assert spread["mean"] == pytest.approx(0.0, abs=1e-12) and spread["significant"] is False


def test_one_seed_has_no_interval():
    d = paired_delta([0.5], [0.52])
    assert d["mean"] == pytest.approx(0.02) and d["std"] is None and d["ci95"] is None
    assert mean_std([0.3]) == (0.3, None)
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="real_fraction"):
        EvaluationSettings(data="x", real_fraction=0).validate()
    with pytest.raises(ValueError, match="seeds"):
        EvaluationSettings(data="x", seeds=(1, 1)).validate()
    with pytest.raises(ValueError, match="unknown evaluation settings"):
        EvaluationSettings.from_dict({"data": "x", "epoch": 3})
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        EvaluationSettings(data="x", guidance_interval=(3, 1)).validate()
    for name in ("sample_batch_size", "train_batch_size"):
        with pytest.raises(ValueError, match=f"{name} must be at least 1, got -5"):
            EvaluationSettings(data="x", **{name: -5}).validate()
    # the seeds the service takes (0..2**31-1), so a CLI run can be made again through the API
    with pytest.raises(ValueError, match=r"synthetic_seed must be in 0\.\.2147483647, got -1"):
        EvaluationSettings(data="x", synthetic_seed=-1).validate()
    with pytest.raises(ValueError, match=r"seeds must be in 0\.\.2147483647, got 2147483648"):
        EvaluationSettings(data="x", seeds=(0, 2**31)).validate()
    with pytest.raises(ValueError, match="width must be at least 2, got 1"):  # the classifiers' own rule
        EvaluationSettings(data="x", width=1).validate()
    with pytest.raises(ValueError, match="steps=0 out of range"):
        EvaluationSettings(data="x", steps=0).validate()
    with pytest.raises(ValueError, match="eta"):
        EvaluationSettings(data="x", sampler="ddim", eta=-1).validate()
    with pytest.raises(ValueError, match="classifier_precision must be one of fp32, bf16, got 'fp16'"):
        EvaluationSettings(data="x", classifier_precision="fp16").validate()


@pytest.mark.parametrize("text, seeds", [("0,1,2", (0, 1, 2)), ("0-4", (0, 1, 2, 3, 4)), ("3", (3,)),
                                         ("0, 5-6", (0, 5, 6)), ("2-2", (2,))])
def test_seeds_parse(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["4-2", "0,4-2", "a", "1-", "-1", "1.5"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(ValueError, match="comma-separated seeds or a rising range"):
        parse_seeds(text)


def test_a_guidance_interval_from_json_reaches_the_sampler_settings():
    s = EvaluationSettings.from_dict({"data": "x", "guidance": 6.0, "guidance_interval": [0.28, 2.9]})
    assert s.guidance_interval == (0.28, 2.9) and s.sampler_settings.guidance_interval == (0.28, 2.9)
    assert s.to_dict()["guidance_interval"] == (0.28, 2.9)
    assert EvaluationSettings.from_dict({"data": "x", "guidance_interval": None}).sampler_settings.guidance_interval \
        is None
    # unguided: no interval recorded in the report's settings, a bad one still refused
    assert EvaluationSettings(data="x", guidance=1.0, guidance_interval=(0.28, 4)).to_dict()["guidance_interval"] is None
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        EvaluationSettings(data="x", guidance=1.0, guidance_interval=(4, 0.28))


def test_a_checkpoint_of_other_classes_is_refused_before_any_image_is_sampled(data_tar, tmp_path, cache_dir,
                                                                              monkeypatch):
    import training.evaluate as ev
    from diffusion.checkpoint import save_checkpoint
    from diffusion.schedules import ScheduleConfig
    from diffusion.unet import UNet, UNetConfig

    other = save_checkpoint(tmp_path / "other", UNet(UNetConfig(base_channels=8, channel_mult=(1,), num_res_blocks=1,
                                                                attn_resolutions=(), dropout=0.0)),
                            ScheduleConfig("linear", 1000), tuple(f"class{i}" for i in range(10)), {})
    monkeypatch.setattr(ev, "synthetic_images", lambda *a, **k: pytest.fail("images were sampled"))
    with pytest.raises(ValueError, match="checkpoint classes .* differ from data set classes"):
        ev.run_evaluation(EvaluationSettings(data=str(data_tar), checkpoint=str(other), synthetic_per_class=2,
                                             epochs=1, seeds=(0,), cache_dir=str(cache_dir)), tmp_path / "out",
                          show_bars=False)


def test_synthetic_labels_follow_the_data_set_class_order():
    synth = LabelledImages(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]), ("b", "c", "a"), "s")
    assert align_classes(synth, ("a", "b", "c")).labels.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="differ"):
        align_classes(synth, ("a", "b", "d"))


def test_each_seed_pairs_its_arms_on_the_same_real_images_and_initial_weights(
        data_tar, tiny_checkpoint, cache_dir, tmp_path, monkeypatch):
    """The delta is paired by seed: a seed's real+synthetic arm trains on exactly its real arm's images plus the
    synthetic set, from the same initial weights; the synthetic arm on the synthetic set alone."""
    import training.evaluate as evaluate

    seen, real_train = {}, evaluate.train_classifier

    def recording(model, x, y, tset, **kw):
        seen[kw["desc"]] = (x.clone(), y.clone(), [t.clone() for t in model.state_dict().values()])
        return real_train(model, x, y, tset, **kw)

    monkeypatch.setattr(evaluate, "train_classifier", recording)
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=8,
                                  synthetic_per_class=1, real_fraction=0.5, epochs=1, seeds=(0, 1), steps=2,
                                  train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    run_evaluation(settings, tmp_path / "run", show_bars=False)
    for seed in (0, 1):
        x_real, y_real, w_real = seen[f"real seed {seed}"]
        x_both, y_both, w_both = seen[f"real+synthetic seed {seed}"]
        x_synth, y_synth, _ = seen[f"synthetic seed {seed}"]
        n = len(y_real)
        assert n == 40 and len(y_synth) == 10 and len(y_both) == n + 10
        assert torch.equal(x_both[:n], x_real) and torch.equal(y_both[:n], y_real)
        assert torch.equal(x_both[n:], x_synth) and torch.equal(y_both[n:], y_synth)
        assert all(torch.equal(a, b) for a, b in zip(w_real, w_both))
    assert not torch.equal(seen["real seed 0"][0], seen["real seed 1"][0])  # each seed draws its own real subset


def test_evaluate_end_to_end_writes_the_report_and_reuses_the_synthetic_cache(
        data_tar, tiny_checkpoint, cache_dir, tmp_path, sampling_calls, capsys, monkeypatch):
    calls = sampling_calls
    monkeypatch.setattr("training.evaluate.cpu_has_bf16", lambda: True)  # the bf16 run below, on any CPU
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=2, real_fraction=0.5, epochs=2, seeds=(0, 1),
                                  sampler=DEFAULT_SETTINGS.sampler, steps=2, guidance=1.5, train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    seen = []
    report = run_evaluation(settings, tmp_path / "run1", progress=lambda f, m: seen.append((f, m)), show_bars=False)
    assert len(calls) == 1
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1] == (1.0, "done")

    on_disk = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk["arms"]) == set(ARMS)
    test_images = 10 * TEST_PER_CLASS
    for arm, a in on_disk["arms"].items():
        assert len(a["accuracies"]) == 2 and all(0 <= v <= 1 for v in a["accuracies"])
        assert a["accuracy_mean"] == pytest.approx(sum(a["accuracies"]) / 2)
        assert a["accuracy_std"] is not None
        assert len(a["per_class_accuracy"]) == 10
        cm = torch.tensor(a["confusion_matrix"])
        assert cm.shape == (10, 10) and cm.sum() == 2 * test_images  # summed over the two seeds
        assert (cm.sum(1) == 2 * TEST_PER_CLASS).all()
        assert len(a["confusion_matrix_per_seed"]) == 2
    train_images = {arm: a["train_images"] for arm, a in on_disk["arms"].items()}
    assert train_images == {"real": 40, "real+synthetic": 60, "synthetic": 20}
    # budget "steps" (the default): every arm takes the real arm's 40 // 8 batches x 2 epochs
    assert {arm: a["train_steps"] for arm, a in on_disk["arms"].items()} == {
        "real": 10, "real+synthetic": 10, "synthetic": 10}
    assert "| real+synthetic | 60 | 10 |" in (tmp_path / "run1" / "report.md").read_text()
    d = on_disk["delta"]
    diffs = [b - a for a, b in zip(on_disk["arms"]["real"]["accuracies"], on_disk["arms"]["real+synthetic"]["accuracies"])]
    paired = paired_delta(on_disk["arms"]["real"]["accuracies"], on_disk["arms"]["real+synthetic"]["accuracies"])
    assert d["per_seed"] == pytest.approx(diffs) and d["ci95"] == pytest.approx(paired["ci95"])  # paired by seed
    assert on_disk["settings"]["synthetic_per_class"] == 2 and on_disk["synthetic"]["reused"] is False
    for f in ["accuracy.png", "per_class.png", "confusion_real.png", "confusion_real_synthetic.png",
              "confusion_synthetic.png"]:
        with Image.open(tmp_path / "run1" / f) as im:
            assert im.format == "PNG" and im.size[0] > 100
    md = (tmp_path / "run1" / "report.md").read_text()
    assert "95% CI" in md and "real+synthetic" in md and "accuracy.png" in md
    assert "fp32 model calls, image j of class c has seed 0 + c x 1,000,000 + j" in md  # tests pin fp32
    assert "trained in fp32" in md and "cpu_bf16" not in on_disk["classifier"]["train_settings"]

    # second run, through the CLI (its default sampler), with another classifier and one seed: same synthetic
    # settings -> cache hit
    dreamdata_cli.main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data_tar),
                        "--classifier", "cnn", "--width", "4", "--synthetic-per-class", "2", "--real-fraction", "0.5",
                        "--epochs", "1", "--budget", "epochs", "--seeds", "3", "--steps", "2", "--guidance", "1.5",
                        "--train-batch-size", "8", "--classifier-precision", "bf16", "--device", "cpu",
                        "--cache-dir", str(cache_dir), "--out", str(tmp_path / "run2")])
    assert len(calls) == 1  # nothing was sampled again
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["delta"]["ci95"] is None
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert second["synthetic"]["reused"] is True
    assert second["synthetic"]["cache_dir"] == on_disk["synthetic"]["cache_dir"]
    assert second["arms"]["real"]["accuracy_std"] is None and second["delta"]["ci95"] is None
    # budget "epochs": one pass over each arm's own set, last partial batch of 8 dropped
    assert {arm: a["train_steps"] for arm, a in second["arms"].items()} == {
        "real": 40 // 8, "real+synthetic": 60 // 8, "synthetic": 20 // 8}
    assert "1 epochs per arm, trained in bf16 autocast" in (tmp_path / "run2" / "report.md").read_text()
    assert second["classifier"]["train_settings"]["cpu_bf16"] is True
    assert second["settings"]["classifier_precision"] == "bf16"
    assert "undefined" in (tmp_path / "run2" / "report.md").read_text()


def _count_training(monkeypatch) -> list[str]:
    """The runs that train from now on (their ``desc``: "real seed 0", ...), in order; each still trains."""
    import training.evaluate as evaluate

    trained: list[str] = []
    real_train = evaluate.train_classifier
    monkeypatch.setattr(evaluate, "train_classifier",
                        lambda model, x, y, tset, **kw: trained.append(kw["desc"]) or real_train(model, x, y, tset, **kw))
    return trained


def test_an_evaluation_checks_for_a_stop_while_it_decodes_its_data(data_tar, tiny_checkpoint, cache_dir, tmp_path,
                                                                    monkeypatch):
    import training.data as data_mod

    monkeypatch.setattr(data_mod, "CHECK_EVERY", 1)
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=1, real_fraction=0.5, epochs=1, seeds=(0,), steps=2,
                                  device="cpu", cache_dir=str(cache_dir / "fresh"))  # nothing decoded yet
    messages = []

    def stop():
        raise InterruptedError("the worker is stopping")

    with pytest.raises(InterruptedError) as stopped:
        run_evaluation(settings, tmp_path / "out", check=stop, show_bars=False,
                       progress=lambda f, m: messages.append(m))
    assert messages == ["loading data"] and "load_dataset" in {entry.name for entry in stopped.traceback}
    assert not (cache_dir / "fresh" / "synthetic").exists()


def test_a_stopped_evaluation_resumes_from_its_saved_runs(data_tar, tiny_checkpoint, cache_dir, tmp_path,
                                                          monkeypatch):
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=2, real_fraction=0.5, epochs=2, seeds=(0, 1), steps=2,
                                  guidance=1.5, train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    whole = run_evaluation(settings, tmp_path / "whole", show_bars=False)
    assert whole["runs"] == {"saved_in": "runs", "reused": []}
    assert len(list((tmp_path / "whole" / "runs").glob("*.json"))) == 6

    class Stop(Exception):
        pass

    def stop_after_two(fraction, message):  # as if the process were killed while training its third run
        if len(list((tmp_path / "cut" / "runs").glob("*.json"))) == 2 and message.startswith("training"):
            raise Stop

    with pytest.raises(Stop):
        run_evaluation(settings, tmp_path / "cut", progress=stop_after_two, show_bars=False)
    assert not (tmp_path / "cut" / "report.json").exists()

    trained = _count_training(monkeypatch)
    resumed = run_evaluation(settings, tmp_path / "cut", show_bars=False)
    assert trained == ["synthetic seed 0", "real seed 1", "real+synthetic seed 1", "synthetic seed 1"]
    assert resumed["runs"]["reused"] == ["real seed 0", "real+synthetic seed 0"]
    for arm in ARMS:  # seeded end to end: the resumed report is the uninterrupted one
        for k in ("accuracies", "confusion_matrix", "per_class_accuracy", "train_steps"):
            assert resumed["arms"][arm][k] == whole["arms"][arm][k], (arm, k)
    assert resumed["delta"] == whole["delta"]
    assert "resumed: 2 of 6 training runs" in (tmp_path / "cut" / "report.md").read_text()

    trained.clear()  # everything saved: nothing trains
    assert len(run_evaluation(settings, tmp_path / "cut", show_bars=False)["runs"]["reused"]) == 6 and not trained
    # other settings have other keys: every run trains again (and replaces the saved one)
    other = run_evaluation(replace(settings, epochs=3), tmp_path / "cut", show_bars=False)
    assert len(trained) == 6 and other["runs"]["reused"] == []
    trained.clear()
    run_evaluation(settings, tmp_path / "cut", show_bars=False, resume=False)   # --restart
    assert len(trained) == 6

    # a damaged run file is trained again, not trusted
    trained.clear()
    (tmp_path / "cut" / "runs" / "real_synthetic-seed1.json").write_text("{\"key\": ")
    assert run_evaluation(settings, tmp_path / "cut", show_bars=False)["arms"]["real+synthetic"]["accuracies"] == \
        whole["arms"]["real+synthetic"]["accuracies"]
    assert trained == ["real+synthetic seed 1"]


def test_saved_runs_are_keyed_by_the_data_sets_content_not_its_path(data_tar, tiny_checkpoint, cache_dir, tmp_path,
                                                                      monkeypatch):
    import shutil

    from tests.evaluation.conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, write_tar

    trained = _count_training(monkeypatch)
    data = shutil.copy(data_tar, tmp_path / "data.tar.gz")
    settings = EvaluationSettings(data=str(data), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=1, real_fraction=0.5, epochs=1, seeds=(0,), steps=2,
                                  guidance=1.5, train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    run_evaluation(settings, tmp_path / "out", show_bars=False)
    assert len(trained) == 3
    moved = shutil.move(data, tmp_path / "elsewhere.tar.gz")  # the same images under another name: reused
    trained.clear()
    assert len(run_evaluation(replace(settings, data=str(moved)), tmp_path / "out",
                              show_bars=False)["runs"]["reused"]) == 3 and trained == []
    # other images at the first path (the data set rebuilt): trained again, not mixed into one report
    write_tar(tmp_path / "data.tar.gz", {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}, seed=1)
    assert run_evaluation(settings, tmp_path / "out", show_bars=False)["runs"]["reused"] == [] and len(trained) == 3


def test_a_synthetic_set_sampled_again_into_its_cache_entry_trains_its_arms_again(data_tar, tiny_checkpoint, cache_dir,
                                                                                    tmp_path, monkeypatch):
    """The run key names the synthetic set's cache entry; a set pruned and sampled again (another machine's
    rounding) has other pixels: the runs that used it train again, the real arm's is reused."""
    import numpy as np

    trained = _count_training(monkeypatch)
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=1, real_fraction=0.5, epochs=1, seeds=(0,), steps=2,
                                  guidance=1.5, train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    first = run_evaluation(settings, tmp_path / "out", show_bars=False)
    assert len(trained) == 3
    png = next(Path(first["synthetic"]["cache_dir"]).glob("images/0/*.png"))
    pixels = np.asarray(Image.open(png).convert("RGB")).copy()
    pixels[0, 0, 0] ^= 1  # one level in one value, as another machine's rounding might
    Image.fromarray(pixels).save(png)
    trained.clear()
    again = run_evaluation(settings, tmp_path / "out", show_bars=False)
    assert again["runs"]["reused"] == ["real seed 0"] and trained == ["real+synthetic seed 0", "synthetic seed 0"]
    # a run saved before runs recorded the set's content is taken on its key alone
    saved = tmp_path / "out" / "runs" / "real_synthetic-seed0.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items()
                                 if k != "synthetic_fingerprint"}))
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(png)
    trained.clear()
    last = run_evaluation(settings, tmp_path / "out", show_bars=False)
    assert last["runs"]["reused"] == ["real seed 0", "real+synthetic seed 0"] and trained == ["synthetic seed 0"]


def test_the_real_arm_is_reused_by_an_experiment_that_changes_only_the_synthetic_set(data_tar, tiny_checkpoint,
                                                                                       cache_dir, tmp_path, monkeypatch):
    import training.evaluate as evaluate

    trained, real_key = _count_training(monkeypatch), evaluate.run_key
    settings = EvaluationSettings(data=str(data_tar), checkpoint=str(tiny_checkpoint), classifier="mlp", width=32,
                                  synthetic_per_class=1, real_fraction=0.5, epochs=1, seeds=(0,), steps=2,
                                  guidance=1.5, train_batch_size=8, device="cpu", cache_dir=str(cache_dir))
    # saved the way runs were keyed until 2026-12-02 (the real arm's key with the synthetic settings in it)
    monkeypatch.setattr(evaluate, "run_key", lambda *a, **k: real_key(*a, **dict(k, legacy=True)))
    first = run_evaluation(settings, tmp_path / "out", show_bars=False)
    monkeypatch.setattr(evaluate, "run_key", real_key)
    saved = json.loads((tmp_path / "out" / "runs" / "real-seed0.json").read_text())
    trained.clear()
    again = run_evaluation(settings, tmp_path / "out", show_bars=False)  # the old keys still count
    assert len(again["runs"]["reused"]) == 3 and trained == []
    migrated = json.loads((tmp_path / "out" / "runs" / "real-seed0.json").read_text())
    assert migrated["key"] != saved["key"] and migrated["accuracy"] == saved["accuracy"]
    # twice the synthetic images, another guidance: only the arms that use them train again
    more = run_evaluation(replace(settings, synthetic_per_class=2, guidance=2.0), tmp_path / "out", show_bars=False)
    assert more["runs"]["reused"] == ["real seed 0"] and trained == ["real+synthetic seed 0", "synthetic seed 0"]
    # ... rightly: trained afresh with those settings, the real arm gives the same result
    fresh = run_evaluation(replace(settings, synthetic_per_class=2, guidance=2.0), tmp_path / "fresh",
                           show_bars=False)
    for k in ("accuracies", "confusion_matrix"):
        assert fresh["arms"]["real"][k] == first["arms"]["real"][k]


def test_classifier_bf16_applies_on_a_cpu_with_bf16_instructions_only(monkeypatch, caplog):
    """--classifier-precision bf16: on a CPU without bf16 instructions fp32 with a warning (emulated bf16 is many
    times slower), as ``dreamdata train`` does; on CUDA never cpu_bf16 (it trains in bf16 anyway: one run key)."""
    from training.evaluate import _classifier_cpu_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("training.evaluate.cpu_has_bf16", lambda: True)
    assert _classifier_cpu_bf16("bf16", cpu) and not _classifier_cpu_bf16("fp32", cpu)
    assert not _classifier_cpu_bf16("bf16", cuda)
    monkeypatch.setattr("training.evaluate.cpu_has_bf16", lambda: None)  # cannot tell: as asked
    assert _classifier_cpu_bf16("bf16", cpu)
    monkeypatch.setattr("training.evaluate.cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="training.evaluate"):
        assert not _classifier_cpu_bf16("bf16", cpu)
    assert "no bf16 instructions" in caplog.text and "fp32" in caplog.text


def test_the_old_real_arm_key_is_the_key_runs_were_saved_under():
    """Pinned digests: the legacy form must equal what the code before 2026-12-02 computed (1becaaad...: by that
    code, for these inputs), or a long experiment resumed across the change would train its real runs again.
    A new EvaluationSettings field changes every key: then update these on purpose."""
    from training.evaluate import run_key

    s = EvaluationSettings(data="d.tar.gz", classifier="cnn", width=16, synthetic_per_class=2500, real_fraction=1.0,
                           epochs=10, budget="steps", seeds=(0, 1, 2), sampler="dpmpp_sde", steps=20, guidance=6.0,
                           eta=0.0, guidance_interval=(0.28, 4.0), synthetic_seed=0, spacing="time")
    kw = dict(data_fingerprint="0123456789abcdef", width=16, checkpoint_sha256="89574521e555" + "0" * 52,
              synthetic_set="89574521e555-dpmpp_sde-s20-g6-i0.28,4-seed0-5a8611e8a6",
              train_settings={"steps": 970, "batch_size": 512}, device=torch.device("cpu"), arm="real", seed=0)
    assert run_key(s, **kw, legacy=True) == "1becaaadc7e244bc7566"
    assert run_key(s, **kw) == "8f77fa3dfe7f46fc55e0"
    assert run_key(replace(s, synthetic_per_class=5000, guidance=4.0), **kw) == "8f77fa3dfe7f46fc55e0"
    # the classifier's arithmetic enters through the training settings (cpu_bf16), which only bf16 runs name
    assert run_key(replace(s, classifier_precision="bf16"), **kw) == "8f77fa3dfe7f46fc55e0"
    bf16 = dict(kw, train_settings={"steps": 970, "batch_size": 512, "cpu_bf16": True})
    assert run_key(replace(s, classifier_precision="bf16"), **bf16) != "8f77fa3dfe7f46fc55e0"
    # the spacing: time (the only one before it was a setting) keeps the keys; logsnr is another synthetic set, but
    # the same real arm
    assert run_key(replace(s, spacing="time"), **kw) == "8f77fa3dfe7f46fc55e0"
    assert run_key(replace(s, spacing="logsnr"), **kw) == "8f77fa3dfe7f46fc55e0"
    logsnr_synthetic = dict(kw, arm="synthetic")
    assert run_key(replace(s, spacing="logsnr"), **logsnr_synthetic) != run_key(s, **logsnr_synthetic)
    synthetic = dict(kw, arm="synthetic")  # 6 and 6.0 are one guidance, 1 and 1.0 one fraction
    assert run_key(replace(s, guidance=6, real_fraction=1), **synthetic) == run_key(s, **synthetic)


def test_evaluate_compile_samples_on_the_compiled_model(data_tar, tiny_checkpoint, cache_dir, tmp_path, monkeypatch,
                                                        cheap_compile):
    """``--compile`` samples through ``compile_for_sampling`` (here on the cheap aot_eager backend) and the report
    says whether this run's sampling was compiled."""
    import torch._inductor.config as inductor_config

    import training.synthetic_cache as synthetic_cache

    real_specs, models = synthetic_cache.sample_specs, []

    def recording(ckpt, specs, *args, **kwargs):
        models.append(type(ckpt.model).__name__)
        return real_specs(ckpt, specs, *args, **kwargs)

    monkeypatch.setattr(synthetic_cache, "sample_specs", recording)
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data_tar), "--classifier", "mlp",
            "--width", "8", "--synthetic-per-class", "1", "--real-fraction", "0.5", "--epochs", "1", "--seeds", "0",
            "--steps", "2", "--guidance", "1.5", "--train-batch-size", "8", "--device", "cpu", "--precision", "fp32",
            "--cache-dir", str(cache_dir)]

    def compiled(out: str) -> bool:
        return json.loads((tmp_path / out / "report.json").read_text())["synthetic"]["compiled"]

    dreamdata_cli.main(args + ["--compile", "--out", str(tmp_path / "compiled")])
    assert models == ["OptimizedModule"] and cheap_compile == [("default", False)] and inductor_config.freezing
    assert compiled("compiled") is True
    dreamdata_cli.main(args + ["--compile", "--out", str(tmp_path / "reused")])
    assert models == ["OptimizedModule"] and compiled("reused") is False  # nothing sampled: nothing compiled
    dreamdata_cli.main(args + ["--synthetic-per-class", "2", "--out", str(tmp_path / "eager")])
    assert models == ["OptimizedModule", "UNet"] and compiled("eager") is False  # without --compile: eager
