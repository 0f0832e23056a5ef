"""Rank <-> subdomain mapping."""

import pytest

from ddmpi.parallel.layout import MappingError, assign_subdomains


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
    with pytest.raises(MappingError, match="5 MPI ranks for 4 subdomains"):
        assign_subdomains(4, 5)
