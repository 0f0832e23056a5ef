"""Layout and data-parallel sharding in one process (``Group.single``; safe under any launch)."""

import types

import pytest
import torch

from ddmpi.parallel.data_parallel import DataParallel
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import MappingError, make_layout


def _replica(rank, size):
    return DataParallel(types.SimpleNamespace(rank=rank, size=size))


def test_shards_cover_all_samples_equally():
    n, size = 103, 4
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    shards = [_replica(r, size).shard(order) for r in range(size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 26
    assert set(torch.cat(shards).tolist()) == set(range(n))
    assert torch.equal(shards[1], _replica(1, size).shard(order))
    plain = _replica(0, 2).shard(torch.arange(10))
    assert plain.tolist() == [0, 2, 4, 6, 8]
    assert [_replica(0, size).local_batch_size(b) for b in (1, 8, 10)] == [1, 2, 3]
    assert _replica(0, size).writes_checkpoints and not _replica(1, size).writes_checkpoints


def test_layout_single_process():
    one = Group.single()
    layout = make_layout(one, 1)
    assert layout.owned == [0] and layout.num_subdomains == 1 and layout.writes
    assert (layout.replicas.size, layout.owners.size, layout.owners.rank) == (1, 1, 0)
    several = make_layout(one, 3)                     # P < S: one rank owns every subdomain
    assert several.owned == [0, 1, 2] and several.replicas.size == 1 and several.writes


def test_layout_errors_single_process():
    with pytest.raises(MappingError, match="at least one"):
        make_layout(Group.single(), 0)
