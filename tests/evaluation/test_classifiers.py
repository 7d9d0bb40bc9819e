import pytest
import torch

from training.classifiers import (augment, build_classifier, confusion_matrix, count_parameters,
                                  default_train_settings, extract_features, predict, train_classifier)


@pytest.mark.parametrize("kind,width,epochs", [("mlp", 64, 15), ("cnn", 8, 15)])
def test_classifier_learns_a_tiny_separable_set(separable, kind, width, epochs):
    x, y = separable
    torch.manual_seed(0)
    model = build_classifier(kind, 10, width)
    before = (predict(model, x) == y).double().mean().item()
    s = default_train_settings(kind, epochs, batch_size=20)
    info = train_classifier(model, x, y, s, seed=0, show_bar=False)
    after = (predict(model, x) == y).double().mean().item()
    assert info["steps"] == epochs * 5
    assert after >= 0.9 > before + 0.3, (before, after)


def test_cpu_bf16_trains_under_bf16_autocast_and_still_learns(separable, monkeypatch):
    """``cpu_bf16``: the CPU training loop runs the model under bf16 autocast (its conv outputs are bf16) and the
    net learns as in fp32; the setting enters the saved-run key only when on, so fp32 keys stay as they were."""
    x, y = separable
    torch.manual_seed(0)
    model = build_classifier("cnn", 10, 8)
    seen = []
    model.body[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    s = default_train_settings("cnn", 15, batch_size=20, cpu_bf16=True)
    train_classifier(model, x, y, s, seed=0, show_bar=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert (predict(model, x) == y).double().mean().item() >= 0.9
    assert model.head.weight.dtype == torch.float32  # autocast: the weights stay fp32
    assert "cpu_bf16" not in default_train_settings("cnn").to_dict()
    assert s.to_dict()["cpu_bf16"] is True
    fp32_model, seen[:] = build_classifier("cnn", 10, 8), []
    fp32_model.body[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    train_classifier(fp32_model, x, y, default_train_settings("cnn", 1, batch_size=20), seed=0, show_bar=False)
    assert seen and set(seen) == {torch.float32}


def test_training_is_reproducible_and_leaves_the_global_rng_alone(separable):
    x, y = separable
    s = default_train_settings("mlp", 2, batch_size=25)
    state = torch.random.get_rng_state()
    weights = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            model = build_classifier("mlp", 10, 32)
        train_classifier(model, x, y, s, seed=7, show_bar=False)
        weights.append(model.head.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert torch.equal(state, torch.random.get_rng_state())


def test_progress_is_reported_up_to_one(separable):
    x, y = separable
    seen = []
    train_classifier(build_classifier("mlp", 10, 16), x, y, default_train_settings("mlp", 3, batch_size=10),
                     progress=seen.append, show_bar=False)
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_shapes_and_parameter_counts():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mlp, cnn = build_classifier("mlp"), build_classifier("cnn", width=64)
    assert count_parameters(mlp) == 3072 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
    assert count_parameters(cnn) == 6_573_120  # Page's ResNet-9
    assert extract_features(mlp, x).shape == (3, 256)
    assert extract_features(build_classifier("cnn", width=8), x).shape == (3, 64)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("vit")


def test_random_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, crop=True, flip=False, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    many = x.repeat(32, 1, 1, 1)  # 64 images: each flipped or not, about half of each
    flipped = augment(many, torch.Generator().manual_seed(1), crop=False, flip=True)
    mirrored = [torch.equal(flipped[i], many[i].flip(-1)) for i in range(len(many))]
    assert all(m or torch.equal(flipped[i], many[i]) for i, m in enumerate(mirrored))
    assert 16 <= sum(mirrored) <= 48  # a flip that never (or always) happens fails


def test_confusion_matrix_counts_rows_true_columns_predicted():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_a_step_budget_overrides_epochs_and_may_end_mid_epoch(separable):
    x, y = separable  # 100 images: 4 full batches of 25 per epoch
    seen = []
    info = train_classifier(build_classifier("mlp", 10, 16), x, y, default_train_settings("mlp", 99, batch_size=25,
                                                                                          steps=10),
                            progress=seen.append, show_bar=False)
    assert (info["steps"], info["epochs"]) == (10, 2.5) and seen[-1] == 1.0
    with pytest.raises(ValueError, match="batch size must be at least 1, got -5"):  # it used to loop forever
        train_classifier(build_classifier("mlp", 10, 16), x, y, default_train_settings("mlp", 1, batch_size=-5,
                                                                                          steps=2), show_bar=False)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        train_classifier(build_classifier("mlp", 10, 16), x, y, default_train_settings("mlp", 1, steps=0),
                         show_bar=False)


class _Recorder(torch.nn.Module):
    """A linear classifier that records which images (by their constant value) each training batch holds."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3 * 32 * 32, 10)
        self.batches: list[list[int]] = []

    def forward(self, x):
        if self.training:
            self.batches.append(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist())
        return self.head(x.flatten(1))


def test_under_a_step_budget_fewer_images_than_a_batch_still_make_full_batches():
    """An arm of 30 images trained beside arms of batch 64 under equal steps takes batches of 64 too, each image
    two or three times in a batch (it used to train on batches of 30); trained for epochs, 30 images are one batch."""
    x = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 3, 32, 32).contiguous()
    y = torch.arange(30) % 10
    model = _Recorder()
    info = train_classifier(model, x, y, default_train_settings("mlp", 1, batch_size=64, steps=5, flip=False),
                            show_bar=False)
    assert (info["steps"], info["batch_size"], info["epochs"]) == (5, 64, round(5 * 64 / 30, 2))
    assert [len(b) for b in model.batches] == [64] * 5
    for batch in model.batches:
        counts = torch.bincount(torch.tensor(batch), minlength=30)
        assert set(counts.tolist()) <= {2, 3} and counts.sum() == 64
    model = _Recorder()
    info = train_classifier(model, x, y, default_train_settings("mlp", 3, batch_size=64, flip=False), show_bar=False)
    assert (info["steps"], info["batch_size"], info["epochs"]) == (3, 30, 3.0)
    assert [sorted(b) for b in model.batches] == [list(range(30))] * 3


def test_the_saved_run_key_of_an_arm_smaller_than_a_batch_names_its_batching():
    """Runs of such arms saved before full batches (smaller batches then) must not be reused; others keep their
    keys, and their saved runs."""
    from training.evaluate import _key_settings

    steps = default_train_settings("cnn", 10, steps=100)
    assert _key_settings(steps, 512) == steps.to_dict()
    assert _key_settings(steps, 511) == dict(steps.to_dict(), small_set_batches="full, from repeated shuffles")
    epochs = default_train_settings("cnn", 10)
    assert _key_settings(epochs, 30) == epochs.to_dict()  # trained for epochs: one batch of 30, as before
