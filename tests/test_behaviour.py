"""What the FTP paper claims, checked at the default sweep's recipe on real data (Fashion-MNIST).

The recipe is `sweeps/sft_grid.py`'s: its `fixed` values (dataset, model, 20k training images of
which 10 % are held out for validation, 2 defense epochs), each attack's backdoor training
(6 epochs; `VICTIMS`: Blended at the paper's pre-training learning rate 0.001, BadNets at 0.01),
and SFT at the paper's learning rates, which are the `SFTSchedule` defaults (FTP §4.4:
LR_BASE 3e-4, LR_MAX1 0.1, LR_MAX2 0.001; phase 1 = the first of the 2 epochs, quarter-epoch
ramps). Each backdoored model is trained once, then SFT and conventional fine-tuning (FT) at the
pre-training learning rate each run once on it for the same number of epochs; every claim below
is read from those same runs (about 3.5 min on one free CPU core):

- the backdoors take: ASR >= 0.9 before any defense;
- SFT brings ASR below 0.2 and keeps clean accuracy within 5 points of the backdoored model's;
- the paper's comparative claim (FTP §5.3: on Blended-CIFAR10 conventional FT leaves ASR at 0.978
  after 100 epochs, SFT brings it from 0.998 to 0.081): on Blended, FT leaves ASR >= FT_FLOOR and
  SFT's ASR is at least MARGIN below FT's.
"""

from __future__ import annotations

import runpy

import pytest
import torch

from conftest import FASHION, ROOT
from secsweep import registry
from secsweep.context import LocalContext

pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")

_SCRIPT = runpy.run_path(str(ROOT / "sweeps" / "sft_grid.py"), run_name="behaviour")
ATTACKS = _SCRIPT["ATTACKS"]
RECIPE = {attack: {**_SCRIPT["SWEEP"].fixed, **_SCRIPT["VICTIMS"][attack], "attack": attack}
          for attack in ATTACKS}   # the default sweep's recipe, so the test checks what users run
ASR_IMPLANTED = 0.9                 # ASR a backdoor must reach before the defense
ASR_REMOVED = 0.2                   # ASR SFT must bring it under
CA_DROP = 0.05                      # clean accuracy SFT may lose against the backdoored model
FT_FLOOR = 0.5                      # Blended ASR conventional FT must leave (it does not remove it)
MARGIN = 0.3                        # FT's Blended ASR minus SFT's, at least


def _run(name: str, attack: str, stage_root, workdir) -> list[dict]:
    spec = registry.get(name)
    ctx = LocalContext(workdir=workdir, stage_root=stage_root)
    spec.fn(spec.build_config(RECIPE[attack]), ctx)
    return ctx.history


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{attack: {"sft": history, "ft": history}}: each backdoor trained once (a shared stage), each
    defense run once. One torch thread, as each trial of the default sweep runs (the numbers move
    with the thread count)."""
    stage_root = tmp_path_factory.mktemp("stages")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {attack: {name: _run(name, attack, stage_root, tmp_path_factory.mktemp(f"{name}-{attack}"))
                        for name in ("sft", "ft")} for attack in ATTACKS}
    finally:
        torch.set_num_threads(threads)
    for attack, h in out.items():
        b, s, f = h["sft"][0], h["sft"][-1], h["ft"][-1]
        print(f"\n{attack}: backdoored ASR {b['asr']:.3f} CA {b['clean_acc']:.3f} | SFT ASR {s['asr']:.3f} "
              f"CA {s['clean_acc']:.3f} | FT@pre-training lr ASR {f['asr']:.3f} CA {f['clean_acc']:.3f}")
    return out


def test_recipe_is_sft_at_the_papers_learning_rates_against_ft_at_the_pretraining_rate():
    """The behaviour below is evidence for the paper's values, not for raised ones (FTP §4.4)."""
    for attack in ATTACKS:
        sft = registry.get("sft").build_config(RECIPE[attack])
        assert (sft.lr_base, sft.lr_max1, sft.lr_max2) == (3e-4, 0.1, 0.001), attack
        ft = registry.get("ft").build_config(RECIPE[attack])
        assert ft.effective_lr == ft.attack_lr == sft.attack_lr, attack  # FT at the victim's pre-training rate
        assert ft.epochs == sft.epochs, attack                            # for as many epochs as SFT
    assert RECIPE["blended"]["attack_lr"] == 0.001  # Blended learnt at the paper's pre-training rate


@pytest.mark.parametrize("attack", ATTACKS)
def test_backdoor_implanted(runs, attack):
    sft, ft = runs[attack]["sft"], runs[attack]["ft"]
    assert sft[0]["epoch"] == 0 and sft[0]["asr"] >= ASR_IMPLANTED, f"{attack}: ASR {sft[0]['asr']:.3f}"
    assert ft[0]["asr"] == sft[0]["asr"]  # both defenses start from the same cached backdoored model


@pytest.mark.parametrize("attack", ATTACKS)
def test_sft_removes_backdoor_and_keeps_clean_accuracy(runs, attack):
    before, after = runs[attack]["sft"][0], runs[attack]["sft"][-1]
    assert after["epoch"] == RECIPE[attack]["epochs"]
    assert after["asr"] < ASR_REMOVED, f"{attack}: SFT left ASR {after['asr']:.3f}"
    assert after["clean_acc"] >= before["clean_acc"] - CA_DROP, \
        f"{attack}: clean accuracy {before['clean_acc']:.3f} -> {after['clean_acc']:.3f}"


def test_sft_removes_blended_where_fine_tuning_at_the_pretraining_lr_does_not(runs):
    sft, ft = runs["blended"]["sft"][-1], runs["blended"]["ft"][-1]
    assert ft["epoch"] == sft["epoch"] == RECIPE["blended"]["epochs"]
    assert ft["asr"] >= FT_FLOOR, f"FT removed Blended too (ASR {ft['asr']:.3f}): no contrast to show"
    assert ft["asr"] - sft["asr"] >= MARGIN, f"FT ASR {ft['asr']:.3f} vs SFT {sft['asr']:.3f}"
