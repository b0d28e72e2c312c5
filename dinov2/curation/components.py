"""Connected components of a duplicate graph with a disjoint-set forest (union-find)."""

import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return int(node)

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]

    def labels(self) -> np.ndarray:
        """Component label of every node: the smallest node number in its component."""
        roots = np.array([self.find(node) for node in range(len(self.parent))], dtype=np.int64)
        smallest = np.full(len(roots), len(roots), dtype=np.int64)
        np.minimum.at(smallest, roots, np.arange(len(roots)))
        return smallest[roots]


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Labels (smallest member) of the components of an undirected graph given as an (E, 2) edge array."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n}), got [{edges.min()}, {edges.max()}]")
    forest = UnionFind(n)
    # Each undirected edge once, self-loops dropped: a kNN graph lists most edges twice.
    edges = np.unique(np.sort(edges[edges[:, 0] != edges[:, 1]], axis=1), axis=0)
    for a, b in edges.tolist():
        forest.union(a, b)
    return forest.labels()
