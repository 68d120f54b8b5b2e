"""secsweep.ops.augment: batched random crop with zero padding and random horizontal flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secsweep.ops import augment


def batch(b=16, c=3, h=8, w=8):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w) / (b * c * h * w)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = batch()
    out = augment.random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):  # every output image is exactly one of the 25 windows of its padded input
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert match, f"image {i} is not a window of its padded input"
        offsets.add(match[0])
    assert len(offsets) > 3  # offsets differ between images of one batch


def test_crop_offsets_cover_the_whole_range_and_pad_with_zeros():
    x = torch.ones(400, 1, 4, 4)
    out = augment.random_crop(x, 1, torch.Generator().manual_seed(1))
    # a shift by one pixel leaves a zero row or column; all 9 offsets occur in 400 draws
    patterns = {tuple((out[i, 0] == 0).flatten().tolist()) for i in range(len(out))}
    assert len(patterns) == 9
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_flip_mirrors_about_half_of_the_images_and_leaves_the_rest():
    x = batch(b=200)
    out = augment.random_hflip(x, torch.Generator().manual_seed(2))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert bool((flipped | kept).all()) and not bool((flipped & kept).any())
    assert 70 < int(flipped.sum()) < 130


def test_seeded_generator_gives_the_same_result_and_another_seed_a_different_one():
    x = batch()
    t = augment.augmentation("crop_flip", 4)
    a = t(x, torch.Generator().manual_seed(3))
    b = t(x, torch.Generator().manual_seed(3))
    c = t(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_kinds():
    assert augment.augmentation("none") is None
    x = batch(b=64)
    crop = augment.augmentation("crop", 2)(x, torch.Generator().manual_seed(5))
    same = augment.random_crop(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(crop, same)  # "crop" never flips
    with pytest.raises(ValueError, match="augment='rotate'"):
        augment.augmentation("rotate")
    with pytest.raises(ValueError, match="padding=-1"):
        augment.random_crop(x, -1, torch.Generator())
    with pytest.raises(ValueError, match="must be"):
        augment.random_crop(x[0], 1, torch.Generator())


def test_padding_zero_and_empty_batch():
    x = batch()
    assert torch.equal(augment.random_crop(x, 0, torch.Generator()), x)
    empty = torch.empty(0, 3, 8, 8)
    assert augment.augmentation("crop_flip")(empty, torch.Generator()).shape == empty.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_same_result_on_gpu():
    x = batch()
    t = augment.augmentation("crop_flip", 4)
    cpu = t(x, torch.Generator().manual_seed(6))
    gpu = t(x.cuda(), torch.Generator().manual_seed(6))
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())


def _record_training_inputs(augment_kind, epochs=2, tmp_path=None):
    """Run the real training loop (secsweep.backdoor.fit) on 8 fixed images and keep what the
    model received in training mode, per epoch, keyed by the input image's position."""
    from secsweep.backdoor import constant, fit
    from secsweep.context import LocalContext
    from secsweep.training import epoch_order

    torch.manual_seed(0)
    images = torch.rand(8, 1, 6, 6)
    labels = torch.arange(8) % 2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
    ctx = LocalContext(workdir=tmp_path)
    fit(model, images, labels, ctx, epochs=epochs, batch_size=8, seed=3, lr_at=constant(0.01),
        transform=augment.augmentation(augment_kind, 1))
    per_epoch = []
    for epoch, batch in enumerate(seen):  # one batch an epoch: reorder to image positions
        order = epoch_order(8, 3, epoch)
        out = torch.empty_like(batch)
        out[order] = batch
        per_epoch.append(out)
    return images, per_epoch


def test_training_with_augment_varies_the_inputs_every_epoch(tmp_path):
    images, (first, second) = _record_training_inputs("crop_flip", tmp_path=tmp_path / "a")
    assert not torch.equal(first, images) and not torch.equal(second, images)
    changed = [not torch.equal(first[i], second[i]) for i in range(8)]
    assert sum(changed) >= 6  # the same image is cropped/flipped differently in epoch 2
    # a restarted run draws the same augmentations: deterministic in (seed, epoch)
    _, (again, _) = _record_training_inputs("crop_flip", tmp_path=tmp_path / "b")
    assert torch.equal(first, again)


def test_training_without_augment_sees_the_stored_images(tmp_path):
    images, (first, second) = _record_training_inputs("none", tmp_path=tmp_path)
    assert torch.equal(first, images) and torch.equal(second, images)
