"""Split a length-sorted batch into groups whose padding stays small, one forward pass each.

A padded forward computes `rows x longest` positions, so one long text makes every row of its
batch as expensive as itself. Each group is padded only to its own longest item; a group
takes the next (longer) item while the group's padding, `rows x longest - sum(sizes)`, stays
within `max_padding_tokens`. That bound is the price of one more forward pass expressed in
tokens: below it, padding is cheaper than another call; above it, another call is cheaper.
On the 2-core dev CPU a forward of the bench classifier costs about 2 ms plus 45 us per
padded token, i.e. one call ~ 45 tokens (BENCHMARKS.md); on a GPU a call costs far more
tokens' worth, so the bound there is larger and groups are bigger.
"""

from __future__ import annotations

from collections.abc import Sequence


def padding_groups(sorted_sizes: Sequence[int], max_padding_tokens: int | None) -> list[range]:
    """Consecutive index ranges covering `sorted_sizes` (shortest first); None = one group."""
    count = len(sorted_sizes)
    if count == 0:
        return []
    if max_padding_tokens is None:
        return [range(count)]
    groups: list[range] = []
    start, total = 0, 0
    for end, size in enumerate(sorted_sizes):
        rows = end - start + 1
        # sizes are ascending, so `size` is the longest of the group start..end
        if rows > 1 and rows * size - (total + size) > max_padding_tokens:
            groups.append(range(start, end))
            start, total = end, 0
        total += size
    groups.append(range(start, count))
    return groups
