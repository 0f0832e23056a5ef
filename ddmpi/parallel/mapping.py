"""Which rank owns which subdomain.

With P ranks and S subdomains, rank r owns the contiguous block
``range(floor(r*S/P), floor((r+1)*S/P))``: one subdomain each when P == S (the design's layout),
a balanced share when P < S. P > S needs hybrid parallelism (one group of ranks per subdomain).
"""


class MappingError(ValueError):
    """The number of ranks does not fit the number of subdomains."""


def assign_subdomains(num_subdomains, num_ranks):
    """List, per rank, of the subdomain indices it owns (balanced, contiguous, in order)."""
    if num_ranks < 1 or num_subdomains < 1:
        raise MappingError("need at least one rank and one subdomain")
    if num_ranks > num_subdomains:
        raise MappingError(
            f"{num_ranks} MPI ranks for {num_subdomains} subdomains: run with at most "
            f"{num_subdomains} ranks, or a multiple of {num_subdomains} with hybrid "
            f"parallelism (one data-parallel group per subdomain)")
    return [list(range(r * num_subdomains // num_ranks, (r + 1) * num_subdomains // num_ranks))
            for r in range(num_ranks)]


def owner_of(subdomain, num_subdomains, num_ranks):
    """Rank that owns ``subdomain`` under :func:`assign_subdomains`."""
    for rank, owned in enumerate(assign_subdomains(num_subdomains, num_ranks)):
        if subdomain in owned:
            return rank
    raise MappingError(f"subdomain {subdomain} out of range 0..{num_subdomains - 1}")
