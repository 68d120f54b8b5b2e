"""What the FTP paper says, on real data at CPU scale (Fashion-MNIST, small CNN, 20k training images).

The backdoored models reach ASR >= 0.9; super-fine-tuning brings ASR below 0.2 within two epochs
while clean accuracy stays within 5 points of the backdoored model's (it rises here: the backdoored
model trained for 3 epochs only). Conventional fine-tuning at the pre-training learning rate is
measured beside it and its numbers are printed (see the README for how it compares at this scale).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FASHION
from secsweep import registry
from secsweep.context import LocalContext

pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
BASE = {"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000, "attack_epochs": 3, "epochs": 2}
# LR_MAX1 0.2: the defender holds 20k images (1/3 of Fashion-MNIST), and FTP §5.5 raises LR_MAX1 when
# the clean data is small (0.3 at 10 %). With the paper's 0.1, Blended ends at ASR 0.11-0.21 here
# depending on thread count, too close to the 0.2 bound for a test (README has the whole grid).
SFT = {"lr_max1": 0.2, "lr_max2": 0.01}


@pytest.fixture(scope="module")
def stage_root(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def run(name, stage_root, tmp_path, **values):
    torch.set_num_threads(2)
    spec = registry.get(name)
    ctx = LocalContext(workdir=tmp_path / name, stage_root=stage_root)
    spec.fn(spec.build_config({**BASE, **values}), ctx)
    return ctx.history


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_sft_removes_backdoor_and_keeps_clean_accuracy(attack, stage_root, tmp_path):
    sft = run("sft", stage_root, tmp_path, attack=attack, **SFT)
    before, after = sft[0], sft[-1]
    assert before["epoch"] == 0 and after["epoch"] == 2
    assert before["asr"] >= 0.9, f"{attack}: backdoor not implanted (ASR {before['asr']:.3f})"
    assert after["asr"] < 0.2, f"{attack}: SFT left ASR {after['asr']:.3f}"
    assert after["clean_acc"] >= before["clean_acc"] - 0.05

    ft = run("ft", stage_root, tmp_path, attack=attack)
    assert ft[0]["asr"] == before["asr"]  # the same cached backdoored model
    print(f"\n{attack}: backdoored ASR {before['asr']:.3f} CA {before['clean_acc']:.3f} | "
          f"SFT ASR {after['asr']:.3f} CA {after['clean_acc']:.3f} | "
          f"FT@pre-training lr ASR {ft[-1]['asr']:.3f} CA {ft[-1]['clean_acc']:.3f}")
