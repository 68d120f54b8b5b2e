"""The transfer scenario's undefended baseline: a new head trained on a FROZEN backbone, which keeps
its weights and its BatchNorm running statistics."""

from __future__ import annotations

import torch
from torch import nn

from secsweep import registry
from secsweep.models import build_model
from trainables.defenses.transfer import train_head


def test_head_training_leaves_backbone_weights_and_bn_statistics_unchanged():
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, in_channels=1, image_size=8)
    # a source model whose BN statistics are not the defaults (as after training on the source data)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8) * 3 + 1)
    model.head = nn.Linear(model.feature_dim, 4)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    head_before = model.head.weight.detach().clone()
    images, labels = torch.rand(96, 1, 8, 8), torch.randint(0, 4, (96,))  # target data: other statistics
    cfg = registry.get("transfer").build_config({"dataset": "digits", "target_dataset": "digits", "head_epochs": 3,
                                                 "batch_size": 32})
    model.train()
    train_head(model, images, labels, cfg, torch.device("cpu"))
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the frozen backbone changed: {changed}"  # running_mean/var, num_batches_tracked, weights
    assert not torch.equal(head_before, model.head.weight)  # the head did train
    assert model.training  # the caller's mode is restored
    assert all(p.requires_grad for p in model.parameters())  # the defense fine-tunes the whole model next
