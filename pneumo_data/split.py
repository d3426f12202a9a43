"""Stage 2 of ingest: patient-grouped, class-stratified, deterministic splits.

Images are first joined into *groups*: two images share a group when they share
a patient id or identical content (sha256), transitively (connected components,
``scipy.sparse.csgraph``). Identical files under different patient ids therefore always land
in the same split, and no patient can be on two sides.

Groups are then assigned to splits per class stratum (a group's class is its
majority label): within each class the groups are shuffled with the seed and cut
where the cumulative image count is closest to the requested fraction. This
keeps the class mix of every split equal to the whole's and hits the requested
fraction in images, not groups. (scikit-learn's ``StratifiedGroupKFold`` was
the first candidate; it can only produce fractions of the form 1/k, so 0.15
would become 1/7 and 0.3 would become 1/3.)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pneumo_data.common.errors import UserError


class LeakageError(UserError):
    """A patient or an identical image would appear in two splits."""


def connected_groups(*keys_per_item: Sequence[Hashable]) -> list[int]:
    """Group index per item: items sharing any key (per key kind) share a group.

    ``connected_groups(patient_ids, hashes)`` joins items with equal patient id
    or equal hash, transitively (the connected components of the graph whose edges join
    items with an equal key, by ``scipy.sparse.csgraph``). ``None`` keys join nothing.
    Group indices are dense and ordered by the first item of each group.
    """
    n = len(keys_per_item[0])
    if any(len(keys) != n for keys in keys_per_item):
        raise ValueError("all key sequences must have one key per item")
    if n == 0:
        return []
    rows, cols = [], []
    for keys in keys_per_item:
        first_seen: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key is not None:
                rows.append(first_seen.setdefault(key, i))
                cols.append(i)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Number the components by their first item (scipy's own numbering is not promised).
    _, first = np.unique(labels, return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(len(first))
    return order[labels].tolist()


def assign_splits(groups: Sequence[int], labels: Sequence[int],
                  fractions: dict[str, float], seed: int) -> list[str]:
    """Split name per item; whole groups only, stratified by the group's class.

    Args:
      groups: group index per item (see :func:`connected_groups`).
      labels: class index per item.
      fractions: split name to fraction of images, e.g. ``{"train": .85,
        "val": .15}``; must sum to 1. The first split takes the remainder.
      seed: makes the assignment deterministic.
    """
    if len(groups) != len(labels):
        raise ValueError("groups and labels must have the same length")
    if not fractions or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    if any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be non-negative, got {fractions}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    strata: dict[int, list[int]] = defaultdict(list)
    for g, items in sorted(members.items()):
        values, counts = np.unique([labels[i] for i in items], return_counts=True)
        strata[int(values[np.argmax(counts)])].append(g)

    names = list(fractions)
    result = [names[0]] * len(groups)
    rng = np.random.default_rng(seed)
    for label in sorted(strata):
        order = list(strata[label])
        rng.shuffle(order)
        sizes = np.array([len(members[g]) for g in order])
        cumulative = np.concatenate([[0], np.cumsum(sizes)])
        total = cumulative[-1]
        start, target = 0, 0.0
        # Later splits (val, test) are cut first, from the front of the shuffled
        # order; the first split (train) keeps what remains.
        for name in names[1:]:
            target += fractions[name] * total
            end = int(np.argmin(np.abs(cumulative - target)))
            end = max(end, start)
            for g in order[start:end]:
                for i in members[g]:
                    result[i] = name
            start = end
    return result


def check_no_leakage(splits: Sequence[str], *keys_per_item: Sequence[Hashable],
                     key_names: Sequence[str] = ()) -> None:
    """Raises LeakageError if any key (patient id, hash) occurs in two splits."""
    for kind, keys in enumerate(keys_per_item):
        seen: dict[Hashable, str] = {}
        clashes = []
        for split, key in zip(splits, keys):
            if key is None:
                continue
            if seen.setdefault(key, split) != split:
                clashes.append((key, seen[key], split))
        if clashes:
            name = key_names[kind] if kind < len(key_names) else f"key {kind}"
            shown = "; ".join(f"{k!r} in {a} and {b}" for k, a, b in clashes[:5])
            raise LeakageError(
                f"{len(clashes)} item(s) share a {name} across splits: {shown}"
                + (" ..." if len(clashes) > 5 else ""))
