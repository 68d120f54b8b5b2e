"""Device checks: run only where CUDA is present (skipped in CI, which has no GPU)."""

from __future__ import annotations

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["sft", "nc", "inputaware"])
def test_trainable_runs_on_cuda(name, tmp_path):
    spec = registry.get(name)
    fields = set(spec.build_config({}).__dataclass_fields__)
    values = {k: v for k, v in {"dataset": "digits", "attack_epochs": 1, "epochs": 1, "batch_size": 64}.items()
              if k in fields}
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages", device="cuda")
    spec.fn(spec.build_config(values), ctx)
    assert ctx.history and 0.0 <= ctx.history[-1]["clean_acc"] <= 1.0
