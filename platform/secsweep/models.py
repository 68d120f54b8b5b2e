"""Image classifiers used by attacks, defenses and detectors, behind a name registry.

Every model maps a float batch (N, C, H, W) with H, W >= 8 to logits (N, num_classes); global
adaptive average pooling makes the spatial size free. Defenses need the same handles on every
model, so each one exposes:

* ``features(x) -> (N, D)``: the penultimate representation (after global pooling, before the head),
  used by Activation Clustering and Spectral Signatures (docs/methods.md §5.8, §5.9);
* ``head``: the final ``nn.Linear(D, num_classes)``; transfer-based experiments replace it with
  ``model.head = nn.Linear(model.feature_dim, k)`` (docs/methods.md §2.2, transfer-based scenario);
* ``last_conv``: the last ``nn.Conv2d`` before the pooling, whose output channels Fine-Pruning masks
  (docs/methods.md §5.4). For every built-in model but the DenseNets ``last_conv.out_channels ==
  feature_dim`` (a DenseNet's last conv makes only the last ``growth_rate`` feature channels; see
  TorchvisionNet; Fine-Pruning therefore prunes the features, not this conv);
* ``attention_layers()``: the modules whose outputs Neural Attention Distillation turns into
  attention maps (docs/methods.md §5.5);
* ``feature_dim``: D, an int;
* ``forward(x) == head(features(x))``.

Built-in image models: ``smallcnn`` (the CPU default), ``preact_resnet18``, and torchvision's
``resnet18``, ``resnet34``, ``resnet50``, ``densenet121``, ``densenet161``, ``mobilenet_v2``
(architectures only, ``weights=None``, with small-input stems: TorchvisionNet).

Adding a model is one decorated builder in this module: ``@register_model("name")``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from secsweep.errors import ConfigError

MIN_IMAGE_SIZE = 8  # pixels: smallest side every model accepts (three stride-2 steps leave 1x1)

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


_IMAGE_MODELS: set[str] = set()  # builders of the image-classifier signature (usable as encoders)


def register_model(name: str, *, image: bool = True) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder to MODELS: an image model ``fn(num_classes, in_channels,
    image_size, **options)`` by default, or (``image=False``) any module builder with keyword
    arguments, e.g. a projection head or a composite of an encoder and a head."""

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ConfigError(f"model={name!r}: already registered by {MODELS[name].__qualname__}")
        MODELS[name] = fn
        if image:
            _IMAGE_MODELS.add(name)
        return fn

    return decorator


def model_names() -> tuple[str, ...]:
    """Registered image-model names (the `model` field of a recipe), sorted."""
    return tuple(sorted(_IMAGE_MODELS))


def _check_options(name: str, builder: ModelBuilder, options: dict[str, Any]) -> None:
    """Raise ConfigError for keyword options the builder does not accept."""
    fixed = {"num_classes", "in_channels", "image_size"}
    allowed = sorted(p for p in inspect.signature(builder).parameters if p not in fixed)
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"model option {key!r} for model={name!r}: must be one of {', '.join(allowed) or '(none)'}"
            )


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **options: Any
) -> nn.Module:
    """Build the registered model `name` for `num_classes` classes and `in_channels`-channel images.

    `image_size` (pixels, the shorter side) is only validated: every model pools adaptively.
    `options` are model-specific keywords, e.g. ``width`` for smallcnn.
    """
    if name not in _IMAGE_MODELS:
        raise ConfigError(f"model={name!r}: must be one of {', '.join(model_names())}")
    if num_classes < 0:
        raise ConfigError(f"num_classes={num_classes}: must be >= 1, or 0 for an encoder (no head)")
    if in_channels < 1:
        raise ConfigError(f"in_channels={in_channels}: must be >= 1")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size={image_size}: must be >= {MIN_IMAGE_SIZE} pixels")
    builder = MODELS[name]
    _check_options(name, builder, options)
    model = builder(num_classes=max(num_classes, 1), in_channels=in_channels, image_size=image_size, **options)
    if num_classes == 0:  # an encoder: the backbone alone, forward(x) == features(x)
        model.head = nn.Identity()
    return model


def build(arch: str, args: dict[str, Any]) -> nn.Module:
    """Build any registered architecture from its artifact description (`secsweep.artifacts`):
    image models take ``num_classes`` (0 = encoder), ``in_channels``, ``image_size`` and their
    options; the other builders (heads, composites) take exactly their own keyword arguments."""
    if arch not in MODELS:
        _import_provider(arch)
    if arch not in MODELS:
        raise ConfigError(f"model={arch!r}: must be one of {', '.join(sorted(MODELS))}")
    args = dict(args)
    if arch in _IMAGE_MODELS:
        return build_model(arch, int(args.pop("num_classes")), int(args.pop("in_channels", 3)),
                           int(args.pop("image_size", 32)), **args)
    builder = MODELS[arch]
    allowed = set(inspect.signature(builder).parameters)
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ConfigError(f"model option {unknown[0]!r} for model={arch!r}: must be one of {', '.join(sorted(allowed))}")
    return builder(**args)


# modules that register further architectures when imported: a card naming one of them can be rebuilt
# in a fresh process that never imported the module (the registry ports, the CLIP models)
_PROVIDERS = (("zoo_", "secsweep.zoo"), ("open_clip", "secsweep.clip"))


def _import_provider(arch: str) -> None:
    import importlib

    for prefix, module in _PROVIDERS:
        if arch.startswith(prefix):
            importlib.import_module(module)


def encoder_names() -> tuple[str, ...]:
    """Image models usable as encoders (backbones): every classifier without its head."""
    return tuple(sorted(_IMAGE_MODELS))


# --------------------------------------------------------------------------------------------------
# smallcnn: the fast CPU model of the offline default (Fashion-MNIST, 1x28x28, 10 classes)
# --------------------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (stride 1, padding 1, no bias: BN follows) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (widths w, 2w, 4w), 2x2 max-pool after the first two, GAP, linear.

    Not from a paper: a secsweep default sized so one epoch of 20k Fashion-MNIST images trains in
    seconds on two CPU cores. ``width`` = 16 (channels of the first block) gives 16, 32, 64: about
    9 s per 20k-image epoch of 28x28 inputs on one CPU thread (width 32 costs ~3x that).
    NAD's attention layers are the three blocks (``block1``, ``block2``, ``block3``; outputs after
    each block's ReLU, before the max-pool).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"width={width}: must be >= 1")
        self.block1 = _conv_bn_relu(in_channels, width)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _conv_bn_relu(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _conv_bn_relu(2 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv of block3; its channels feed the global pool one-to-one (after BN and ReLU)."""
        return self.block3[0]

    def attention_layers(self) -> list[nn.Module]:
        """[block1, block2, block3]: NAD attention maps come from each block's output."""
        return [self.block1, self.block2, self.block3]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (N, feature_dim), after global average pooling."""
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) = head(features(x))."""
        return self.head(self.features(x))


@register_model("smallcnn")
def smallcnn(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 16) -> nn.Module:
    """SmallCNN; `width` (channels of the first block, default 16) scales all three blocks."""
    return SmallCNN(num_classes, in_channels, width=width)


# --------------------------------------------------------------------------------------------------
# preact_resnet18: He et al. 2016, "Identity Mappings in Deep Residual Networks" (ECCV), CIFAR variant
# --------------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, Fig. 4e): BN-ReLU-conv3x3, BN-ReLU-conv3x3, + shortcut.

    The shortcut is the identity, or a bias-free 1x1 conv applied to the pre-activated input when the
    stride or the width changes (the projection shortcut of He et al., as in BackdoorBench).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in, H, W) -> (N, out, H/stride, W/stride)."""
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016), the architecture BackdoorBench recommends (FTP §4.4).

    CIFAR stem: one 3x3 conv, 64 channels, stride 1, no max-pool. Four stages of two PreActBlocks,
    widths 64, 128, 256, 512 and strides 1, 2, 2, 2; a final BN + ReLU (pre-activation nets need it
    because blocks end in a conv, He et al. 2016 §4), global average pool, linear head.
    11,172,170 parameters for 10 classes (BackdoorBench's variant without the final BN: 11,171,146).

    NAD's attention layers are the outputs of the last three stages (``layer2``, ``layer3``,
    ``layer4``), the counterpart of the three residual groups of WRN-16-1 that Li et al. (ICLR 2021)
    distil. (BackdoorBench's NAD uses layer3, layer4 and the pooled layer4 output instead.)

    ``last_conv`` is ``layer4[-1].conv2``; its 512 output channels equal ``feature_dim``, but they
    are added to the identity shortcut before the final BN, so masking them silences the residual
    branch only. To silence a feature channel completely, mask the matching input column of
    ``head`` (what BackdoorBench's Fine-Pruning does) or the output of ``features``.
    """

    widths = (64, 128, 256, 512)  # channels per stage (He et al. 2016, CIFAR ResNet-18 widths)
    strides = (1, 2, 2, 2)  # first-block stride per stage
    blocks_per_stage = 2  # ResNet-18: 2 basic blocks per stage

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, self.widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        channels = self.widths[0]
        for width, stride in zip(self.widths, self.strides):
            stages.append(self._stage(channels, width, stride))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.head = nn.Linear(channels, num_classes)

    def _stage(self, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        """`blocks_per_stage` PreActBlocks; only the first one changes stride and width."""
        blocks = [PreActBlock(in_channels, out_channels, stride)]
        blocks += [PreActBlock(out_channels, out_channels, 1) for _ in range(self.blocks_per_stage - 1)]
        return nn.Sequential(*blocks)

    @property
    def last_conv(self) -> nn.Conv2d:
        """conv2 of the last block of stage 4 (see the class docstring on the residual sum)."""
        return self.layer4[-1].conv2

    def attention_layers(self) -> list[nn.Module]:
        """[layer2, layer3, layer4]: outputs of the last three stages, for NAD attention maps."""
        return [self.layer2, self.layer3, self.layer4]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (N, 512), after final BN-ReLU and global average pooling."""
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.relu(self.bn(x))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) = head(features(x))."""
        return self.head(self.features(x))


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """PreActResNet18 (He et al. 2016; FTP §4.4's backdoored-model architecture)."""
    return PreActResNet18(num_classes, in_channels)


# --------------------------------------------------------------------------------------------------
# torchvision architectures (resnet18/34/50, densenet121/161, mobilenet_v2), small-input variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How one torchvision family is adapted to 28- and 32-pixel inputs and where its handles are
    (module paths inside the torchvision model, ``TorchvisionNet.net``)."""

    stem: str                    # the first conv: replaced by a 3x3, stride-1, padding-1 conv from in_channels
    stem_fan: str                # kaiming_normal_ mode torchvision initialises the family's convs with
    removed: tuple[str, ...]     # modules replaced by nn.Identity (the ImageNet stem's max-pool)
    unstrided: tuple[str, ...]   # convs whose stride becomes 1
    classifier: str              # the attribute holding the classifier, replaced by nn.Identity
    linear: str                  # the classifier's nn.Linear, which becomes `head`
    attention: tuple[str, ...]   # NAD's attention layers: the last three stages


_RESNET = _Family(stem="conv1", stem_fan="fan_out", removed=("maxpool",), unstrided=(), classifier="fc",
                  linear="fc", attention=("layer2", "layer3", "layer4"))
_DENSENET = _Family(stem="features.conv0", stem_fan="fan_in", removed=("features.pool0",), unstrided=(),
                    classifier="classifier", linear="classifier",
                    attention=("features.denseblock2", "features.denseblock3", "features.denseblock4"))
# features.2 is the first stride-2 inverted residual (16 -> 24 channels); its depthwise conv is conv.1.0
_MOBILENET = _Family(stem="features.0.0", stem_fan="fan_out", removed=(), unstrided=("features.2.conv.1.0",),
                     classifier="classifier", linear="classifier.1",
                     attention=("features.6", "features.13", "features.18"))
TORCHVISION_MODELS = {"resnet18": _RESNET, "resnet34": _RESNET, "resnet50": _RESNET,
                      "densenet121": _DENSENET, "densenet161": _DENSENET, "mobilenet_v2": _MOBILENET}


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class TorchvisionNet(nn.Module):
    """A torchvision classifier (``torchvision.models.<arch>(weights=None)``: the architecture only,
    randomly initialised by torchvision, nothing downloaded) adapted to small inputs and given the
    handles of this module. Its layers are torchvision's, under ``net``; the changes, per family:

    * ResNet-18/34/50 (He et al. 2016): the CIFAR stem of the literature. ``conv1`` (7x7, stride 2)
      becomes a 3x3 stride-1 conv from ``in_channels`` to 64 channels and ``maxpool`` is removed, so
      the four stages see 32, 16, 8, 4 pixels of a 32-pixel image (ImageNet's stem would leave 1x1
      after stage 4 and 2x2 already after stage 2).
    * DenseNet-121/161 (Huang et al. 2017): the same for its stem, ``features.conv0`` (7x7, stride 2)
      becomes a 3x3 stride-1 conv to ``num_init_features`` (64 / 96) channels and ``features.pool0``
      is removed; the four dense blocks and three transitions are unchanged (32, 16, 8, 4 pixels),
      as the CIFAR DenseNets start with one 3x3 conv and no pooling.
    * MobileNetV2 (Sandler et al. 2018): the stem conv (``features.0.0``, 3x3 stride 2) gets stride 1
      and ``in_channels`` inputs, and the first stride-2 inverted residual (``features.2``, 16 -> 24
      channels) gets stride 1 in its depthwise conv: the network downsamples by 8 instead of 32
      (4x4 final maps at 32 pixels, 3x3 at 28, instead of 1x1), the usual CIFAR MobileNetV2. The
      classifier's Dropout(0.2) is dropped so that ``head`` is one ``nn.Linear`` applied to
      ``features`` (the contract of every model here); add dropout in the training recipe if needed.

    The replaced stems are initialised as torchvision initialises the family's other convs
    (kaiming-normal; fan-out for ResNet and MobileNetV2, fan-in for DenseNet). Handles:

    * ``head``: torchvision's final ``nn.Linear`` (``fc`` / ``classifier`` / ``classifier[1]``),
      moved out of ``net`` (whose classifier is an identity), so ``features(x) == net(x)``, the
      globally average-pooled output of the last stage (DenseNet: after ``norm5`` and a ReLU);
    * ``feature_dim``: 512 (resnet18/34), 2048 (resnet50), 1024 (densenet121), 2208 (densenet161),
      1280 (mobilenet_v2);
    * ``last_conv``: the last ``nn.Conv2d`` of ``net``. ResNets: ``layer4[-1].conv2`` (basic block)
      or ``conv3`` (bottleneck), ``out_channels == feature_dim``, summed with the block's identity
      shortcut before the pool (as in preact_resnet18: masking it silences the residual branch only).
      MobileNetV2: ``features[18][0]``, the 1x1 conv 320 -> 1280, ``out_channels == feature_dim``,
      one-to-one with the features after its BN and ReLU6 (as in smallcnn). DenseNets: the last
      dense layer's 3x3 conv (``features.denseblock4`` last ``conv2``), ``out_channels ==
      growth_rate`` (32 / 48): its output is the *last* ``growth_rate`` of the ``feature_dim``
      concatenated channels, so it is not one-to-one with the features (no DenseNet conv is);
    * ``attention_layers()``: the outputs of the last three stages, ResNets ``layer2``, ``layer3``,
      ``layer4``; DenseNets ``denseblock2``, ``denseblock3``, ``denseblock4`` (the concatenations,
      before the transitions and ``norm5``); MobileNetV2 ``features[6]``, ``features[13]``,
      ``features[18]`` (the ends of the 32-, 96- and 1280-channel resolutions). The deepest has
      ``feature_dim`` channels.
    """

    def __init__(self, arch: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        import torchvision  # here, not at import time: most processes never build these models

        family = TORCHVISION_MODELS[arch]
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        old = net.get_submodule(family.stem)
        stem = nn.Conv2d(in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode=family.stem_fan, nonlinearity="relu")
        _replace(net, family.stem, stem)
        for path in family.removed:
            _replace(net, path, nn.Identity())
        for path in family.unstrided:
            net.get_submodule(path).stride = (1, 1)
        self.head: nn.Module = net.get_submodule(family.linear)
        _replace(net, family.classifier, nn.Identity())
        self.net = net
        self.arch = arch
        self.feature_dim = self.head.in_features
        self._attention = family.attention
        # a path, not the module: an attribute would register the conv twice in the state_dict
        self._last_conv = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)][-1]

    @property
    def last_conv(self) -> nn.Conv2d:
        """The last conv of ``net`` (see the class docstring for how its channels meet the features)."""
        return self.net.get_submodule(self._last_conv)

    def attention_layers(self) -> list[nn.Module]:
        """The last three stages of ``net`` (class docstring), for NAD attention maps."""
        return [self.net.get_submodule(path) for path in self._attention]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (N, feature_dim): torchvision's forward without the classifier."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) = head(features(x))."""
        return self.head(self.features(x))


def _torchvision_builder(arch: str) -> ModelBuilder:
    def builder(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return TorchvisionNet(arch, num_classes, in_channels)

    builder.__qualname__ = builder.__name__ = arch
    builder.__doc__ = f"torchvision's {arch} (weights=None), small-input variant: see TorchvisionNet."
    return builder


for _arch in TORCHVISION_MODELS:
    register_model(_arch)(_torchvision_builder(_arch))


# --------------------------------------------------------------------------------------------------
# heads and composites: what encoder-based methods put on top of a backbone
# --------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``layers`` linear layers in_dim -> hidden ... -> out_dim, BatchNorm + ReLU between them
    (SimCLR's projection head is the 2-layer case; a 1-layer MLP is a linear layer)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, layers: int = 2, batch_norm: bool = True):
        super().__init__()
        if layers < 1:
            raise ConfigError(f"layers={layers}: must be >= 1")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < layers - 1:
                mods += [nn.BatchNorm1d(b)] if batch_norm else []
                mods.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*mods)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp", image=False)
def mlp(in_dim: int, out_dim: int, hidden_dim: int = 512, layers: int = 2, batch_norm: bool = True) -> nn.Module:
    """An MLP head (projection heads, downstream classifiers, predictors)."""
    return MLP(in_dim, out_dim, hidden_dim, layers, batch_norm)


class EncoderClassifier(nn.Module):
    """A downstream classifier: an encoder (backbone) followed by a linear or MLP head.

    It has the handles every defense uses (``features``, ``head``, ``feature_dim``, ``last_conv``,
    ``attention_layers``), delegated to the backbone, so the defenses of the standalone scenario
    (FT, SFT, NC, ...) run unchanged on a classifier built on a pre-trained encoder (docs/methods.md,
    the encoder-based scenario).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, hidden_dim: int = 0, head_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = encoder.feature_dim
        head = (nn.Linear(self.feature_dim, num_classes) if hidden_dim <= 0 else
                MLP(self.feature_dim, num_classes, hidden_dim, layers=2, batch_norm=False))
        # head_norm: a BatchNorm1d on the encoder's features before the head. SSL features of an
        # unseen downstream dataset can lie in a narrow cone (mean pairwise cosine ~0.99 for a
        # Fashion-MNIST encoder on MNIST), which a plain head learns slowly; the BatchNorm centres
        # and scales each feature (it trains with the head; the encoder is unchanged).
        self.head = nn.Sequential(nn.BatchNorm1d(self.feature_dim), head) if head_norm else head

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.encoder.last_conv

    def attention_layers(self) -> list[nn.Module]:
        return self.encoder.attention_layers()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("encoder_classifier", image=False)
def encoder_classifier(encoder: dict, num_classes: int, hidden_dim: int = 0, head_norm: bool = False) -> nn.Module:
    """`encoder`: the backbone's artifact description ``{"arch": ..., "args": {...}}`` (built without
    a head); `hidden_dim` 0 = a linear head, > 0 = a 2-layer MLP head of that width; `head_norm` a
    BatchNorm1d on the features before the head (off by default: cards written without it rebuild)."""
    backbone = build(encoder["arch"], {**encoder.get("args", {}), "num_classes": 0})
    return EncoderClassifier(backbone, num_classes, hidden_dim, head_norm)
