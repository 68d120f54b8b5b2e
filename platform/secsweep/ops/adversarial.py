"""L-infinity adversarial examples: FGSM, BIM, PGD, DI-FGSM and HybridFool (docs/methods.md,
Adversarial examples).

Formulas (J = the attacked model's loss, by default the cross-entropy of its logits against the true
label y; Clip_{x,eps} = projection onto the L-inf ball {x' : |x' - x|_inf <= eps} intersected with
the valid pixel box [0, 1]):

    FGSM     x' = Clip_{x,eps}( x + eps * sign(grad_x J(theta, x, y)) )                  (T-Eq 5.1)
    BIM      x(0) = x,  x(t+1) = Clip_{x,eps}( x(t) + alpha * sign(grad_x J(theta, x(t), y)) )
                                                                                          (T-Eq 5.2)
    PGD      BIM started at x(0) = Clip_[0,1]( x + u ),  u ~ U(-eps, eps)^d  (Madry et al. 2018)
    DI-FGSM  the gradient is taken at a random transform T(x) of the input (input diversity):
               x' = Clip_{x,eps}( x + eps * sign(grad_x J(theta_s, T(x), y)) )        (T-Eq 5.3)
             T = "noise":      T(x) = x + eta,  eta ~ N(0, noise_std^2)  (the documents' variant)
             T = "resize_pad": random resize to r x r and zero-pad at a random offset, each with
                               probability p (Xie et al. 2019, CVPR, "Improving transferability of
                               adversarial examples with input diversity")
             single-step as the documents write it; `steps > 1` gives Xie et al.'s iterative
             DI^2-FGSM (BIM with input diversity at every step).
    HybridFool  x' = Clip_[0,1]( x + eps * sign(grad_x d(E_i(x), e_t)) )                  (T-Eq 5.4)
             d = a distance between the image embedding E_i(x) and the given text embedding
             e_t, maximised; cosine distance 1 - cos by default (the documents leave d open).

Conventions shared by every attack here:

* Inputs are images in [0, 1]; any normalisation lives inside the model, so eps and alpha are in
  pixel units of [0, 1] (eps = 8/255 is "8 grey levels"). An input outside [0, 1] is refused.
* Untargeted by default (J is increased); `targeted=True` takes y as the target labels and
  decreases J instead (x(t+1) = x(t) - alpha * sign(grad)).
* The model is put in eval mode for the attack (batch-norm statistics and dropout frozen, so the
  gradient is that of the deployed function) and every submodule's own mode is restored afterwards.
* Gradients are taken with `torch.autograd.grad` with respect to the input only: nothing is
  accumulated into the model parameters' `.grad`.
* Batch-wise, on the device of the inputs (the model must live there too); the result is detached,
  of x's shape and dtype.
* Randomness (PGD's start, DI's transforms) comes only from a CPU `torch.Generator` (default: a
  fresh one seeded with 0): values are drawn on the CPU and moved to the batch's device, so a given
  seed gives the same attack on CPU and GPU, up to floating-point differences of the model.

Defaults and where they come from: steps = 10 and alpha = 2.5 * eps / steps for the iterative
attacks (Madry et al. 2018's rule of thumb: the iterate can cross the ball and back; the documents
give neither, docs/methods.md); alpha = eps when steps = 1 (then BIM is FGSM). DI: p = 0.5 and a
resize rate of 0.9 (Xie et al. use p = 0.5 and enlarge 299 -> [299, 330) then pad to 330; a rate
< 1 shrinks to [0.9 H, H) and pads back to H, so models with a fixed input size still accept the
result; a rate > 1 enlarges as Xie et al. do and needs a model that takes the larger size); the
noise variant adds eta with probability 1 (the documents' formula has no p) and noise_std = 0.03
(about 8/255, the scale of a typical L-inf budget; the documents do not give eta's distribution).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DI_NOISE_STD", "DI_P_RESIZE", "DI_RESIZE_RATE", "STEPS", "bim", "default_alpha", "di_fgsm",
           "eval_mode", "fgsm", "hybrid_fool", "input_diversity", "pgd", "project"]

STEPS = 10             # iterations of BIM / PGD (implementation choice; docs/methods.md)
DI_P_RESIZE = 0.5      # probability of the resize-and-pad transform per step (Xie et al. 2019)
DI_RESIZE_RATE = 0.9   # resize range [0.9 H, H), padded back to H (see the module docstring)
DI_NOISE_STD = 0.03    # std of the documents' additive noise eta, pixel units (their value is not stated)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_alpha(eps: float, steps: int) -> float:
    """Step size when none is given: eps for one step, else 2.5 * eps / steps (Madry et al. 2018)."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    return float(eps) if steps == 1 else 2.5 * float(eps) / steps


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode; restore every submodule's own `training` flag on exit.

    Restoring per submodule (not `model.train(was_training)`) keeps mixed states intact, e.g. a
    model whose batch-norm layers were frozen in eval while the rest trains.
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x shape={what}: must be a non-empty floating-point batch (N, ...) of images")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x range=[{lo:.4g}, {hi:.4g}]: must lie in [0, 1] (normalisation belongs inside "
                         "the model, eps is in pixel units)")


def _step(eps: float, alpha: float | None, steps: int) -> float:
    """The step size to use: `alpha`, else `default_alpha`; any positive step when eps = 0 (the
    projection then returns x whatever the step)."""
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    return 1.0 if eps == 0 and alpha == 0 else alpha


def _check_budget(eps: float, alpha: float, steps: int) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps={eps!r}: must be >= 0 (L-inf radius in pixel units of [0, 1])")
    if not alpha > 0.0:
        raise ValueError(f"alpha={alpha!r}: must be > 0 (step size in pixel units)")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")


def _labels(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y shape={what}: must hold one label per image ({x.shape[0]})")
    return y.detach().to(x.device)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip_{x,eps}: onto the L-inf ball of radius eps around x, then into [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if generator.device.type != "cpu":
        raise ValueError(f"generator device={generator.device}: must be a CPU torch.Generator (values are "
                         "drawn on the CPU and moved to the batch's device)")
    return generator


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
            start: torch.Tensor | None, transform: Callable[[torch.Tensor], torch.Tensor] | None,
            loss_fn: LossFn, targeted: bool) -> torch.Tensor:
    """The shared loop: `steps` signed-gradient steps of size alpha, projected after each step."""
    _check_images(x)
    _check_budget(eps, alpha, steps)
    y = _labels(y, x)
    x = x.detach()
    x_adv = x.clone() if start is None else project(start, x, eps)
    direction = -1.0 if targeted else 1.0
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            inp = transform(x_adv) if transform is not None else x_adv
            loss = loss_fn(model(inp), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + direction * alpha * grad.sign(), x, eps)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, targeted: bool = False,
         loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): x' = Clip_[0,1](x + eps * sign(grad_x J(x, y))).

    Args:
        model: maps a batch in [0, 1] to logits (normalisation inside).
        x: (N, ...) images in [0, 1]; y: (N,) labels (targets when `targeted`).
        eps: L-inf radius in pixel units.
        loss_fn: J(logits, y) -> scalar; the mean cross-entropy by default (its sign of gradient is
            that of the summed per-sample losses: one batched call attacks every image separately).
    """
    return _attack(model, x, y, eps=eps, alpha=_step(eps, None, 1), steps=1, start=None,
                   transform=None, loss_fn=loss_fn, targeted=targeted)


def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
        steps: int = STEPS, targeted: bool = False, loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """BIM / I-FGSM (Kurakin et al. 2017): `steps` FGSM steps of size alpha, each clipped to the
    eps-ball around x and to [0, 1]. alpha defaults to `default_alpha(eps, steps)`."""
    return _attack(model, x, y, eps=eps, alpha=_step(eps, alpha, steps), steps=steps, start=None,
                   transform=None, loss_fn=loss_fn, targeted=targeted)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
        steps: int = STEPS, random_start: bool = True, generator: torch.Generator | None = None,
        targeted: bool = False, loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """PGD (Madry et al. 2018, L-inf): BIM from a uniform random start x + U(-eps, eps), clipped to
    [0, 1]. The start is drawn on the CPU from `generator` (seed 0 when None) as
    `torch.empty(x.shape).uniform_(-eps, eps)`, then moved to x's device."""
    alpha = _step(eps, alpha, steps)
    start = None
    if random_start:
        _check_images(x)
        g = _generator(generator)
        noise = torch.empty(x.shape, dtype=x.dtype).uniform_(-float(eps), float(eps), generator=g)
        start = (x.detach() + noise.to(x.device)).clamp(0.0, 1.0)
    return _attack(model, x, y, eps=eps, alpha=alpha, steps=steps, start=start,
                   transform=None, loss_fn=loss_fn, targeted=targeted)


def input_diversity(x: torch.Tensor, generator: torch.Generator, *, kind: str = "resize_pad",
                    p: float | None = None, resize_rate: float = DI_RESIZE_RATE,
                    noise_std: float = DI_NOISE_STD) -> torch.Tensor:
    """One random input-diversity transform T(x) of a batch (differentiable in x).

    "resize_pad" (Xie et al. 2019): with probability p (default 0.5) resize the (square) batch with
    nearest-neighbour interpolation (as Xie et al.) to r x r, r uniform over the integers in
    [min(H, rate*H), max(H, rate*H)), and zero-pad at a uniformly random offset to max(H, rate*H);
    otherwise T(x) = x (resized to that output size when rate > 1, so every step sees one shape).
    One transform per batch and call, as in Xie et al.

    "noise" (the documents' variant, T-Eq 5.3): with probability p (default 1) add eta ~ N(0,
    noise_std^2) element-wise; x + eta is not clipped (the model takes any real input, and a clamp
    would zero the gradient of the clipped pixels).
    """
    if kind == "noise":
        p = 1.0 if p is None else p
        if not 0.0 <= p <= 1.0 or not noise_std >= 0.0:
            raise ValueError(f"p={p!r}, noise_std={noise_std!r}: p must be in [0, 1], noise_std >= 0")
        apply = bool(torch.rand((), generator=generator) < p)
        if not apply:
            return x
        eta = torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_std
        return x + eta.to(x.device)
    if kind != "resize_pad":
        raise ValueError(f"kind={kind!r}: must be one of 'resize_pad', 'noise'")
    p = DI_P_RESIZE if p is None else p
    if not 0.0 <= p <= 1.0 or not resize_rate > 0.0:
        raise ValueError(f"p={p!r}, resize_rate={resize_rate!r}: p must be in [0, 1], resize_rate > 0")
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x shape={tuple(x.shape)}: resize_pad needs a square (N, C, H, H) batch")
    side = x.shape[-1]
    scaled = int(side * resize_rate)
    lo, out = min(side, scaled), max(side, scaled)
    apply = bool(torch.rand((), generator=generator) < p)
    if not apply:
        return x if out == side else F.interpolate(x, size=(out, out), mode="nearest")
    r = lo if out == lo else int(torch.randint(lo, out, (), generator=generator))
    rem = out - r
    top = int(torch.randint(0, rem + 1, (), generator=generator))
    left = int(torch.randint(0, rem + 1, (), generator=generator))
    resized = F.interpolate(x, size=(r, r), mode="nearest")
    return F.pad(resized, (left, rem - left, top, rem - top), value=0.0)


def di_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, diversity: str = "resize_pad",
            p: float | None = None, resize_rate: float = DI_RESIZE_RATE, noise_std: float = DI_NOISE_STD,
            steps: int = 1, alpha: float | None = None, generator: torch.Generator | None = None,
            targeted: bool = False, loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """DI-FGSM: the signed-gradient step taken at T(x) (see `input_diversity`), T drawn afresh per step.

    steps = 1 (default) is the documents' single step x' = x + eps * sign(grad J(theta_s, T(x), y))
    (T-Eq 5.3, with `diversity="noise"` their additive eta); steps > 1 is Xie et al.'s iterative
    DI^2-FGSM with step alpha (default `default_alpha(eps, steps)`), clipped to the eps-ball and
    [0, 1] after every step. Deterministic for a given generator state (seed 0 when None).
    """
    g = _generator(generator)
    alpha = _step(eps, alpha, steps)

    def transform(z: torch.Tensor) -> torch.Tensor:
        return input_diversity(z, g, kind=diversity, p=p, resize_rate=resize_rate, noise_std=noise_std)

    return _attack(model, x, y, eps=eps, alpha=alpha, steps=steps, start=None,
                   transform=transform, loss_fn=loss_fn, targeted=targeted)


def _distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=1)
    if kind == "l2":
        return (a - b).norm(dim=1)
    raise ValueError(f"distance={kind!r}: must be one of 'cosine', 'l2'")


def hybrid_fool(x: torch.Tensor, image_embed_fn: Callable[[torch.Tensor], torch.Tensor],
                text_embedding: torch.Tensor, eps: float, *, distance: str = "cosine") -> torch.Tensor:
    """HybridFool (DE-FAKE, T-Eq 5.4): one signed-gradient step that pushes the image embedding away
    from its prompt's text embedding: x' = Clip_[0,1](x + eps * sign(grad_x sum_i d(E_i(x_i), e_i))).

    Args:
        x: (N, ...) images in [0, 1].
        image_embed_fn: E_i, maps the batch to (N, D) embeddings (e.g. a CLIP image encoder or its
            bound `encode_image`; an `nn.Module`, or a bound method of one, is put in eval mode
            for the step and restored).
        text_embedding: (N, D) or (D,) text embeddings e_t, treated as constants (detached).
        eps: L-inf step in pixel units.
        distance: "cosine" (1 - cos, default) or "l2" (Euclidean); the documents do not name d.
    """
    _check_images(x)
    _check_budget(eps, 1.0, 1)
    owner = image_embed_fn if isinstance(image_embed_fn, nn.Module) else getattr(image_embed_fn, "__self__", None)
    modules = (owner,) if isinstance(owner, nn.Module) else ()
    x = x.detach()
    x_adv = x.clone().requires_grad_(True)
    with eval_mode(*modules), torch.enable_grad():
        emb = image_embed_fn(x_adv)
        if emb.dim() != 2 or emb.shape[0] != x.shape[0]:
            raise ValueError(f"image embedding shape={tuple(emb.shape)}: must be (N={x.shape[0]}, D)")
        text = text_embedding.detach().to(device=emb.device, dtype=emb.dtype)
        if text.dim() == 1:
            text = text.expand_as(emb)
        if text.shape != emb.shape:
            raise ValueError(f"text_embedding shape={tuple(text_embedding.shape)}: must be (D,) or (N, D) "
                             f"matching the image embedding {tuple(emb.shape)}")
        (grad,) = torch.autograd.grad(_distance(emb, text, distance).sum(), x_adv)
    return (x + float(eps) * grad.sign()).clamp(0.0, 1.0).detach()
