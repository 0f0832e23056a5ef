"""Rank <-> subdomain mapping."""

import pytest

from ddmpi.parallel.layout import MappingError, assign_evaluation, assign_subdomains


@pytest.mark.parametrize("subdomains, ranks", [(4, 4), (4, 2), (4, 1), (8, 3), (27, 5), (16, 16)])
def test_every_subdomain_owned_once_and_balanced(subdomains, ranks):
    owned = assign_subdomains(subdomains, ranks)
    assert sorted(s for part in owned for s in part) == list(range(subdomains))
    sizes = [len(part) for part in owned]
    assert max(sizes) - min(sizes) <= 1
    assert all(part == sorted(part) for part in owned)


def test_one_per_rank_is_identity():
    assert assign_subdomains(4, 4) == [[0], [1], [2], [3]]


def test_more_ranks_than_subdomains_is_an_error():
    """... that never recommends what was given (5 and 8 ranks alike)."""
    for ranks in (5, 8):
        with pytest.raises(MappingError, match=f"^{ranks} MPI ranks for 4 subdomains: a block "
                                               f"of subdomains for every rank needs at most 4 "
                                               f"ranks$"):
            assign_subdomains(4, ranks)


@pytest.mark.parametrize("subdomains, ranks", [(2, 4), (2, 3), (4, 2), (4, 4), (1, 3)])
def test_evaluation_takes_any_rank_count(subdomains, ranks):
    """ddmpi predict: the first min(P, S) ranks own blocks, the others none."""
    owned = assign_evaluation(subdomains, ranks)
    owners = min(subdomains, ranks)
    assert len(owned) == ranks and owned[:owners] == assign_subdomains(subdomains, owners)
    assert owned[owners:] == [[]] * (ranks - owners)
