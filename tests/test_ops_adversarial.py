"""Unit tests for secsweep.ops.adversarial: FGSM, BIM, PGD, DI-FGSM, HybridFool.

FGSM, BIM, PGD (with and without random start) and DI-FGSM without diversity are cross-checked
against torchattacks (a test-only reference, the `test` extra) on a tiny CNN: where the algorithms
coincide the outputs agree to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from secsweep.ops.adversarial import (
    bim,
    default_alpha,
    di_fgsm,
    eval_mode,
    fgsm,
    hybrid_fool,
    input_diversity,
    pgd,
)

N, C, H, K = 6, 1, 8, 3


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * H * H, K))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    m = _cnn()
    # non-trivial batch-norm statistics, so train and eval mode give different functions
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, C, H, H, generator=g)
    x[0, 0, :2] = 0.0   # pixels at the box's edges, where clipping to [0, 1] matters
    x[1, 0, :2] = 1.0
    return x, torch.randint(0, K, (N,), generator=g)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_fgsm_matches_torchattacks(model, batch, eps):
    x, y = batch
    _close(fgsm(model, x, y, eps), torchattacks.FGSM(model, eps=eps)(x, y))


def test_bim_matches_torchattacks(model, batch):
    x, y = batch
    _close(bim(model, x, y, 0.1, alpha=0.02, steps=5), torchattacks.BIM(model, eps=0.1, alpha=0.02, steps=5)(x, y))


def test_targeted_bim_matches_torchattacks(model, batch):
    x, y = batch
    target = (y + 1) % K
    ref = torchattacks.BIM(model, eps=0.1, alpha=0.02, steps=5)
    ref.set_mode_targeted_by_function(lambda images, labels: target)
    out = bim(model, x, target, 0.1, alpha=0.02, steps=5, targeted=True)
    _close(out, ref(x, y))
    # and it does what a targeted attack should: the target's cross-entropy goes down
    with torch.no_grad():
        assert F.cross_entropy(model(out), target) < F.cross_entropy(model(x), target)


def test_pgd_matches_torchattacks_without_and_with_random_start(model, batch):
    x, y = batch
    kw = dict(eps=0.1, alpha=0.02, steps=5)
    _close(pgd(model, x, y, random_start=False, **kw), torchattacks.PGD(model, random_start=False, **kw)(x, y))
    # the random start: torchattacks draws uniform_(-eps, eps) from the global CPU generator, ours
    # from a CPU generator seeded the same way: the same numbers, so the same attack
    torch.manual_seed(123)
    ref = torchattacks.PGD(model, random_start=True, **kw)(x, y)
    out = pgd(model, x, y, generator=torch.Generator().manual_seed(123), **kw)
    _close(out, ref)
    assert not torch.equal(out, pgd(model, x, y, generator=torch.Generator().manual_seed(124), **kw))


def test_di_without_diversity_matches_torchattacks_difgsm(model, batch):
    x, y = batch
    ref = torchattacks.DIFGSM(model, eps=0.1, alpha=0.02, steps=4, decay=0.0, diversity_prob=0.0)(x, y)
    _close(di_fgsm(model, x, y, 0.1, p=0.0, steps=4, alpha=0.02), ref)


def test_single_step_bim_is_fgsm_and_default_alpha(model, batch):
    x, y = batch
    assert default_alpha(0.1, 1) == 0.1 and default_alpha(0.1, 10) == pytest.approx(0.025)
    _close(bim(model, x, y, 0.05, steps=1), fgsm(model, x, y, 0.05))


@pytest.mark.parametrize("attack", ["fgsm", "bim", "pgd", "di_resize", "di_noise", "di_iter"])
def test_eps_ball_and_pixel_box_respected(model, batch, attack):
    x, y = batch
    eps = 0.07
    out = {
        "fgsm": lambda: fgsm(model, x, y, eps),
        "bim": lambda: bim(model, x, y, eps, alpha=0.05, steps=6),  # alpha large: projection matters
        "pgd": lambda: pgd(model, x, y, eps, alpha=0.05, steps=6),
        "di_resize": lambda: di_fgsm(model, x, y, eps, p=1.0),
        "di_noise": lambda: di_fgsm(model, x, y, eps, diversity="noise"),
        "di_iter": lambda: di_fgsm(model, x, y, eps, steps=5, alpha=0.05),
    }[attack]()
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    assert float((out - x).abs().max()) <= eps + 1e-6
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - x).abs().max()) > 0.5 * eps  # it moved


def test_fgsm_lowers_accuracy_more_as_eps_grows():
    # two classes of 1x8x8 images: per-pixel mean 0.45 vs 0.55, noise std 0.2 (overlapping a little)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = (0.45 + 0.1 * y.float().view(-1, 1, 1, 1) + 0.2 * torch.randn(400, 1, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)

    def acc(eps: float) -> float:
        adv = fgsm(net, x, y, eps) if eps > 0 else x
        with torch.no_grad():
            return float((net(adv).argmax(1) == y).float().mean())

    accs = [acc(e) for e in (0.0, 0.01, 0.03, 0.1)]
    assert accs[0] > 0.85, accs  # measured 0.915 (the classes overlap a little by design)
    assert all(a > b for a, b in zip(accs, accs[1:])), accs  # strictly lower at every larger eps
    assert accs[-1] < 0.2, accs


@pytest.mark.parametrize("diversity", ["resize_pad", "noise"])
def test_di_deterministic_per_seed(model, batch, diversity):
    x, y = batch

    def run(seed: int) -> torch.Tensor:
        return di_fgsm(model, x, y, 0.05, diversity=diversity, p=1.0, steps=3,
                       generator=torch.Generator().manual_seed(seed))

    a, b = run(1), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(2))
    # the transform changes the gradient: not the plain BIM result
    assert not torch.equal(a, bim(model, x, y, 0.05, steps=3))


def test_input_diversity_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 10, 10, generator=g)
    assert torch.equal(input_diversity(x, g, p=0.0), x)
    shrunk = input_diversity(x, g, p=1.0)                       # rate 0.9: resized into [9, 10), padded to 10
    assert shrunk.shape == x.shape and not torch.equal(shrunk, x)
    assert int((shrunk == 0).all(dim=0).all(dim=0).sum()) >= 10  # a zero-padded row and column
    grown = input_diversity(x, g, p=1.0, resize_rate=1.3)      # Xie et al.'s enlarging variant
    assert grown.shape == (2, 1, 13, 13)
    assert input_diversity(x, g, p=0.0, resize_rate=1.3).shape == (2, 1, 13, 13)
    noisy = input_diversity(x, g, kind="noise", noise_std=0.1)
    assert noisy.shape == x.shape and 0.05 < float((noisy - x).std()) < 0.15
    with pytest.raises(ValueError, match="kind="):
        input_diversity(x, g, kind="rotate")
    with pytest.raises(ValueError, match="square"):
        input_diversity(torch.rand(1, 1, 4, 6), g)


def test_model_modes_restored_and_no_parameter_gradients(batch):
    x, y = batch
    m = _cnn(1).train()
    m[1].eval()  # a mixed state: frozen batch norm inside a training model
    modes = [mod.training for mod in m.modules()]
    stats = m[1].running_mean.clone()
    reference = {name: fn(_cnn(1).eval()) for name, fn in _attacks(x, y).items()}
    for name, fn in _attacks(x, y).items():
        out = fn(m)
        # computed in eval mode: equal to the attack on an eval-mode copy (dropout would differ)
        torch.testing.assert_close(out, reference[name], atol=0, rtol=0)
        assert [mod.training for mod in m.modules()] == modes, name
        assert all(p.grad is None for p in m.parameters()), name
    assert torch.equal(m[1].running_mean, stats)  # no batch-norm update during the attack


def _attacks(x, y):
    return {
        "fgsm": lambda m: fgsm(m, x, y, 0.05),
        "bim": lambda m: bim(m, x, y, 0.05, steps=3),
        "pgd": lambda m: pgd(m, x, y, 0.05, steps=3),
        "di": lambda m: di_fgsm(m, x, y, 0.05, steps=2),
    }


def test_eval_mode_context_restores_on_error():
    m = _cnn().train()
    with pytest.raises(RuntimeError), eval_mode(m):
        assert not m.training
        raise RuntimeError("boom")
    assert all(mod.training for mod in m.modules())


def test_input_checks(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"x range="):
        fgsm(model, x * 2 - 0.5, y, 0.1)
    with pytest.raises(ValueError, match="eps="):
        bim(model, x, y, -0.1)
    with pytest.raises(ValueError, match="steps="):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="y shape="):
        fgsm(model, x, y[:2], 0.1)
    assert torch.equal(fgsm(model, x, y, 0.0), x)  # eps = 0 is the identity


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Dropout(0.5), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * H * H, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_hybrid_fool_increases_the_distance(batch, distance):
    x, _ = batch
    enc = _Embed().train()
    text = torch.randn(N, 5, generator=torch.Generator().manual_seed(4))

    def dist(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(enc):
            e = enc(images)
        return 1 - F.cosine_similarity(e, text, dim=1) if distance == "cosine" else (e - text).norm(dim=1)

    out = hybrid_fool(x, enc.encode_image, text, 0.01, distance=distance)  # a bound method: mode handled
    assert float((out - x).abs().max()) <= 0.01 + 1e-6 and float(out.min()) >= 0 and float(out.max()) <= 1
    assert bool((dist(out) > dist(x)).all())
    assert enc.training and all(p.grad is None for p in enc.parameters())
    # one text embedding (D,) for the whole batch broadcasts
    single = hybrid_fool(x, enc, text[0], 0.01, distance=distance)
    assert single.shape == x.shape
    with pytest.raises(ValueError, match="distance="):
        hybrid_fool(x, enc, text, 0.01, distance="kl")
