"""ALMA's prompt diversification (algorithms.md 3.2.1): k-means over the prompts' embeddings, and each
round one previously unused prompt from each of K picked clusters.

The paper clusters 100M synthetic prompts into 1M clusters and takes K = 50k prompts a round; the
scaled numbers are in conf/experiment/alma.yaml. k-means here is Lloyd's algorithm with k-means++
seeding on L2-normalised vectors (so distances compare directions, as cosine similarity does), in
numpy: a few hundred prompts need no more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from orchestrator.types import Prompt, Record


@dataclass
class Assignment(Record):
    """A pool prompt's cluster and its distance to the cluster's centre."""

    prompt_id: str
    cluster: int
    distance: float


def normalised(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances, points x centres, as |x|^2 - 2 x.c + |c|^2 (no points x centres x dims array)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, centres, inertia) of k-means on the rows of ``x``: k-means++ seeding, then Lloyd's
    steps until the labels stop changing or ``iterations`` steps. A cluster left empty is given the
    point farthest from its centre. Deterministic for a ``seed``."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means with {k} clusters needs at least {k} points, got {n}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d = _sq_dist(x, np.asarray(centres)).min(1)
        total = d.sum()
        centres.append(x[rng.choice(n, p=d / total)] if total > 0 else x[rng.integers(n)])
    c = np.asarray(centres)
    labels = np.full(n, -1)
    for _ in range(max(1, iterations)):
        d = _sq_dist(x, c)
        new = d.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
            else:  # re-seed an empty cluster with the point worst served by its centre
                far = int(d[np.arange(n), labels].argmax())
                c[j], labels[far] = x[far], j
    d = _sq_dist(x, c)
    return labels, c, float(d[np.arange(n), labels].sum())


def assign(
    prompt_ids: Sequence[str], vectors: Sequence[Sequence[float]], k: int, seed: int, iterations: int
) -> tuple[list[Assignment], dict[str, float]]:
    """Cluster the prompts (``vectors[i]`` embeds ``prompt_ids[i]``) into ``k`` clusters; the records and
    the clustering's metrics."""
    x = normalised(vectors)
    labels, centres, inertia = kmeans(x, k, seed, iterations)
    dist = np.sqrt(_sq_dist(x, centres)[np.arange(len(x)), labels])
    sizes = np.bincount(labels, minlength=k)
    records = [Assignment(pid, int(c), float(d)) for pid, c, d in zip(prompt_ids, labels, dist)]
    return records, {
        "clusters/k": float(k), "clusters/pool": float(len(x)), "clusters/inertia": inertia,
        "clusters/size_min": float(sizes.min()), "clusters/size_max": float(sizes.max()),
        "clusters/nonempty": float((sizes > 0).sum()),
    }


def pick(
    pool: Sequence[Prompt], assignments: Sequence[Assignment], used: set[str], k: int, rng: random.Random
) -> tuple[list[Prompt], dict[str, float]]:
    """A round's prompts: ``k`` clusters drawn at random among those with a prompt not in ``used``, and
    one such prompt drawn at random from each. Fewer than ``k`` when fewer clusters have one left
    (``alma/clusters_available`` says how many had), none once the pool is used up."""
    cluster_of = {a.prompt_id: a.cluster for a in assignments}
    unused: dict[int, list[Prompt]] = {}
    for p in pool:
        if p.id not in used and p.id in cluster_of:
            unused.setdefault(cluster_of[p.id], []).append(p)
    chosen = rng.sample(sorted(unused), min(k, len(unused)))
    picked = [rng.choice(unused[c]) for c in chosen]
    total = len(set(cluster_of.values()))
    before = {cluster_of[i] for i in used if i in cluster_of}
    return picked, {
        "alma/clusters_available": float(len(unused)),
        "alma/round_clusters": float(len(chosen)),
        # the share of the pool's clusters that some round has drawn a prompt from, this one included
        "alma/cluster_coverage": len(before | set(chosen)) / total if total else 0.0,
        "alma/pool_unused": float(sum(len(v) for v in unused.values()) - len(picked)),
        "prompts/picked": float(len(picked)),
        "prompts/self_instruct": float(sum(p.source == "self_instruct" for p in picked)),
    }
