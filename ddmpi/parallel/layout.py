"""Which rank owns which subdomain, and the groups that follow from it.

P <= S ranks: rank r owns the balanced contiguous block ``floor(r*S/P) .. floor((r+1)*S/P)-1``.
P = k*S ranks (hybrid): k consecutive ranks per subdomain train its CNN data-parallel; the
group leaders hold the decisions. Evaluation (``ddmpi predict``) takes any P: the first
min(P, S) ranks own blocks, the others idle.
"""

from dataclasses import dataclass

from ddmpi.parallel.group import Group


class MappingError(ValueError):
    """The number of ranks does not fit the number of subdomains."""


def assign_subdomains(num_subdomains, num_ranks):
    """List, per rank, of the subdomain indices it owns (balanced, contiguous, in order)."""
    if num_ranks < 1 or num_subdomains < 1:
        raise MappingError("need at least one rank and one subdomain")
    if num_ranks > num_subdomains:
        raise MappingError(f"{num_ranks} MPI ranks for {num_subdomains} subdomains: a block of "
                           f"subdomains for every rank needs at most {num_subdomains} ranks")
    return [list(range(r * num_subdomains // num_ranks, (r + 1) * num_subdomains // num_ranks))
            for r in range(num_ranks)]


def assign_evaluation(num_subdomains, num_ranks):
    """List, per rank, of the subdomains whose CNNs it evaluates, for any number of ranks: the
    blocks of :func:`assign_subdomains` over the first min(P, S) ranks, none for the others."""
    owners = min(num_ranks, num_subdomains)
    return assign_subdomains(num_subdomains, owners) + [[] for _ in range(num_ranks - owners)]


@dataclass
class Layout:
    """This rank's place: its subdomains, its replica group and the decision holders."""

    world: Group
    num_subdomains: int
    owned: list      # subdomains whose CNNs this rank trains
    replicas: Group  # the ranks training the same CNNs (size 1 without hybrid parallelism)
    owners: Group    # one rank per set of CNNs (the replica leaders); inactive elsewhere

    @property
    def writes(self):
        """This rank writes its subdomains' checkpoints and decisions."""
        return self.owners.active


def check_layout(num_ranks, num_subdomains):
    """Raise :class:`MappingError` unless ``num_ranks`` ranks can share ``num_subdomains``
    (at most one rank per subdomain, or a multiple of them under hybrid parallelism)."""
    if num_ranks < 1 or num_subdomains < 1:
        raise MappingError("need at least one rank and one subdomain")
    if num_ranks > num_subdomains and num_ranks % num_subdomains:
        raise MappingError(f"hybrid parallelism needs the number of MPI ranks ({num_ranks}) to "
                           f"be a multiple of the number of subdomains ({num_subdomains}): "
                           f"decomposition.grid")


def make_layout(world, num_subdomains):
    """Collective over ``world``: the layout of ``num_subdomains`` over its ranks."""
    size, s_total = world.size, num_subdomains
    check_layout(size, s_total)
    if size <= s_total:
        owned = assign_subdomains(s_total, size)[world.rank]
        return Layout(world, s_total, owned, Group.single(), world)
    k = size // s_total
    sub = world.rank // k
    replicas = world.split(sub)
    owners = world.split(0 if replicas.rank == 0 else None, key=sub)
    return Layout(world, s_total, [sub], replicas, owners)
