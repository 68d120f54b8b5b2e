"""The registry contract: every trainable runs one tiny epoch and reports its declared metrics.

Parametrized over the registry, so a new method is covered the moment its file exists. Runs in a
plain loop (LocalContext) on sklearn digits: no Ray, no MLflow, seconds per trainable.
"""

from __future__ import annotations

import math

import pytest
import torch

from secsweep import artifacts, registry
from secsweep.context import LocalContext

torch.set_num_threads(1)
TINY = {"dataset": "digits", "model": "smallcnn", "attack_epochs": 1, "attack_batch_size": 64}
# DE-FAKE: one-epoch generators (and their clean judge) under the corpus and the detectors
_TINY_GEN = {"epochs": 1, "fidelity_samples": 5, "classifier": {"trainable": "clean", "epochs": 1}}
_TINY_DDPM = {"width": 8, "sample_steps": 5}
_TINY_GENERATORS = {f"generator{i}": {"trainable": t, **_TINY_GEN, **(_TINY_DDPM if t == "ddpm" else {})}
                    for i, t in enumerate(("ddpm", "cgan", "vae"), 1)}
PER_KIND = {
    "defense": {"epochs": 1, "batch_size": 64},
    "encoder": {"epochs": 1, "batch_size": 64, "monitor_size": 200, "train_size": 600},
    # DE-FAKE (tests/test_defake.py): one-epoch generators, a tiny corpus over them, one-epoch detectors
    "generator": dict(_TINY_GEN),
    "corpus": {"per_source": 60, **_TINY_GENERATORS},
    "fake_detector": {"epochs": 1, "corpus": {"trainable": "defake_corpus", "dataset": "digits", "per_source": 60,
                                              **_TINY_GENERATORS},
                      "clip": {"trainable": "clip", "dataset": "digits", "epochs": 1, "train_size": 600,
                               "monitor_size": 200, "image_size": 8, "vision_patch": 4}},
}
# DE-FAKE prompt analysis: that tiny corpus's one-epoch image-only detector, the same tiny CLIP
PER_KIND["analysis"] = {"detector": {"trainable": "defake_image", "task": "detect",
                                     **{k: v for k, v in PER_KIND["fake_detector"].items() if k != "clip"}},
                        "clip": PER_KIND["fake_detector"]["clip"]}


# trainables whose data is fixed by what they wrap (a registry model's task)
PER_NAME = {"zoo": {"dataset": "mnist", "train_size": 600}}
# the CLIP victims (CLIP-Backdoor, BadCLIP) on that tiny digits CLIP, zero-shot on digits
_CLIP_VICTIM = {"encoder": PER_KIND["fake_detector"]["clip"], "downstream_dataset": "digits", "eval_size": 100}
PER_NAME["clip_backdoor"] = dict(_CLIP_VICTIM)
PER_NAME["badclip"] = {**_CLIP_VICTIM, "patch_steps": 2, "finetune_epochs": 1, "n_target_images": 10}
# model stealing: a tiny target of the kind each attack steals, digits for every dataset field
_STEAL = {"epochs": 1, "batch_size": 64, "surrogate_dataset": "digits", "surrogate_size": 300,
          "downstream_dataset": "digits", "probe_train_size": 300, "probe_test_size": 200}
_STEAL_ENCODER = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
                  "monitor_size": 100}
PER_NAME.update({name: {**_STEAL, "target": _STEAL_ENCODER} for name in ("encoder_steal", "cont_steal")})
PER_NAME["classifier_steal"] = {**_STEAL, "target": {"trainable": "clean", "dataset": "digits", "epochs": 1}}
# transfer attacks: a one-epoch Cont-Steal of the tiny target, another tiny SimCLR as the springboard
PER_NAME["adv_transfer"] = {"surrogate": {"trainable": "cont_steal", **_STEAL, "target": _STEAL_ENCODER},
                            "springboard": {**_STEAL_ENCODER, "seed": 1}, "steps": 2, "probe_train_size": 300,
                            "probe_test_size": 200}
# BadEncoder on a tiny digits SimCLR; the downstream classifier on that BadEncoder (its trigger path)
_DIGITS_SIMCLR = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
                  "monitor_size": 100}
_BADENCODER = {"encoder": _DIGITS_SIMCLR, "downstream_dataset": "digits", "shadow_size": 200, "n_reference": 3,
               "epochs": 1, "batch_size": 64, "monitor_size": 100}
PER_NAME["badencoder"] = _BADENCODER
PER_NAME["ddpm"] = dict(_TINY_DDPM)
# PoisonedEncoder on digits (digits downstream too); EncoderMI on two tiny digits SimCLRs
PER_NAME["poisonedencoder"] = {"epochs": 1, "batch_size": 64, "monitor_size": 200, "train_size": 600,
                               "downstream": "digits", "downstream_size": 300, "n_reference": 20}
PER_NAME["encodermi"] = {"target": _DIGITS_SIMCLR, "shadow": {**_DIGITS_SIMCLR, "seed": 1}, "n_samples": 40}
# DRUPE: that tiny BadEncoder plus its distribution term; CTRL: a one-epoch poisoned digits SimCLR
PER_NAME["drupe"] = {**_BADENCODER, "n_reference": 10}
PER_NAME["ctrl"] = {"epochs": 1, "batch_size": 64, "monitor_size": 100, "train_size": 300,
                    "downstream_dataset": "digits", "downstream_size": 300, "poison_rate": 0.05}
PER_KIND["downstream"] = {"encoder": {"trainable": "badencoder", **_BADENCODER}, "epochs": 1, "train_size": 600,
                          "batch_size": 64}
# the ownership watermark check: that tiny BadEncoder, a one-epoch Cont-Steal of it, the clean SimCLR
PER_NAME["watermark"] = {"target": {"trainable": "badencoder", **_BADENCODER}, "steal_size": 200, "steal_epochs": 1,
                         "steal_batch_size": 64, "probe_train_size": 300, "probe_test_size": 200}
# sample detectors (secsweep.sample_detection) on that tiny BadEncoder: small test sets and downstream protocol
PER_KIND["sample_detector"] = {"victim": {"trainable": "badencoder", **_BADENCODER}, "test_size": 100,
                               "downstream_size": 300, "downstream_epochs": 1, "epochs": 1}
PER_NAME["dede"] = {"train_size": 200, "patch_size": 2, "width": 32, "heads": 2, "encoder_depth": 1,
                    "decoder_depth": 1}
PER_NAME["asset"] = {"base_size": 50}
PER_NAME["decree"] = {"shadow_size": 100}  # of the tiny SimCLR's 270 pre-training digits
# backdoor detection on a clean model: a one-epoch digits CNN, one NC epoch, tiny STRIP / NEO scans
PER_NAME["audit_backdoor_fpr"] = {"model": {"trainable": "clean", "dataset": "digits", "epochs": 1},
                                  "nc_epochs": 1, "nc_images": 32, "strip_images": 50, "neo_images": 4,
                                  "neo_regions": 20, "neo_confirm": 30}
# every audit (stealing, MIA, evasion) of a one-epoch digits CNN; its black-box surrogate one epoch too
PER_KIND["audit"] = {"model": {"trainable": "clean", "dataset": "digits", "epochs": 1}, "max_samples": 100,
                     "epochs": 1, "aux_size": 100, "mlp_epochs": 2,
                     "transfer_surrogate": {"trainable": "clean", "epochs": 1}}
# values built in the test's folder: DE-FAKE's text-to-image corpus needs a pipeline and a caption
# folder (a tiny random Stable Diffusion and 12 captioned faces, tests/test_defake_t2i.py)
PER_NAME_BUILT = {"defake_t2i_corpus": lambda root: __import__("test_defake_t2i").contract_values(root)}


@pytest.mark.parametrize("name", registry.names())
def test_trainable_runs_one_tiny_epoch_and_reports_declared_metrics(name, tmp_path):
    spec = registry.get(name)
    fields = set(spec.build_config({}).__dataclass_fields__)
    built = PER_NAME_BUILT[name](tmp_path / "built") if name in PER_NAME_BUILT else {}
    values = {k: v for k, v in {**TINY, **PER_KIND.get(spec.kind, {}), **PER_NAME.get(name, {}), **built}.items()
              if k in fields}
    cfg = spec.build_config(values)
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(cfg, ctx)
    assert ctx.history, f"{name} reported nothing"
    last = ctx.history[-1]
    for metric in spec.metrics:
        assert metric in last, f"{name} did not report {metric}"
        assert isinstance(last[metric], float) and math.isfinite(last[metric])
    assert last["device_hours"] >= 0
    assert (tmp_path / "w" / "outputs").exists(), "trainable saved no output"
    # the model artifacts its kind promises, each rebuildable from its card alone
    for output, role in spec.contract.outputs.items():
        model, card = artifacts.load(tmp_path / "w" / "outputs", output, role=role)
        assert card.role == role and card.provenance.get("trainable", name) == name
        if card.input is not None:
            x = torch.rand(2, card.input.channels, card.input.size, card.input.size)
            out = model.eval()(x)
            assert out.shape[0] == 2 and torch.isfinite(out).all()
