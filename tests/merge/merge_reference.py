"""Independent, loop-based references of the release's CLAP and GBM for one image (float64, lists, no tricks).

They follow the semantics of the authors' release (tue-mps/algm-segmenter, docs/ALGM.md): pairwise window cosines, top-r
windows, ``[prefix, merged windows by descending score, unmerged cells ascending]``; GBM's alternate split over the
whole sequence, best match, top-r A tokens merged, ``[prefix, unmerged A in A order, B in B order]``.
Each returns (tokens as a list of float64 vectors, sizes, groups: list of sets of grid cells per slot).
"""
from __future__ import annotations

from typing import List, Set, Tuple

import torch


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def clap_reference(x: torch.Tensor, num_prefix: int, grid: Tuple[int, int], window: Tuple[int, int], r: int
                   ) -> Tuple[List[torch.Tensor], List[float], List[Set[int]]]:
    h, w = grid
    kh, kw = window
    patches = x[num_prefix:].double()
    windows = []
    for gy in range(h // kh):
        for gx in range(w // kw):
            cells = [(gy * kh + dy) * w + gx * kw + dx for dy in range(kh) for dx in range(kw)]
            pair = [_cos(patches[i], patches[j]) for i in cells for j in cells if i != j]
            windows.append((sum(pair) / len(pair), cells))
    order = sorted(range(len(windows)), key=lambda i: -windows[i][0])[:r]
    tokens = [x[i].double() for i in range(num_prefix)]
    sizes = [1.0] * num_prefix
    groups: List[Set[int]] = [set() for _ in range(num_prefix)]
    merged_cells: Set[int] = set()
    for index in order:
        cells = windows[index][1]
        tokens.append(torch.stack([patches[c] for c in cells]).mean(0))
        sizes.append(float(len(cells)))
        groups.append(set(cells))
        merged_cells |= set(cells)
    for c in range(h * w):
        if c not in merged_cells:
            tokens.append(patches[c])
            sizes.append(1.0)
            groups.append({c})
    return tokens, sizes, groups


def gbm_reference(tokens: List[torch.Tensor], sizes: List[float], groups: List[Set[int]], num_prefix: int, r: int
                  ) -> Tuple[List[torch.Tensor], List[float], List[Set[int]]]:
    a_idx = list(range(0, len(tokens), 2))
    b_idx = list(range(1, len(tokens), 2))
    best = {}
    for i in a_idx:
        if i < num_prefix:
            continue
        scores = [(_cos(tokens[i], tokens[j]), j) for j in b_idx if j >= num_prefix]
        if scores:
            best[i] = max(scores, key=lambda s: s[0])
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    sums = {j: tokens[j] * sizes[j] for j in b_idx}
    new_sizes = {j: sizes[j] for j in b_idx}
    new_groups = {j: set(groups[j]) for j in b_idx}
    for i in merged:
        j = best[i][1]
        sums[j] = sums[j] + tokens[i] * sizes[i]
        new_sizes[j] += sizes[i]
        new_groups[j] |= groups[i]
    prefix = list(range(num_prefix))
    kept_a = [i for i in a_idx if i >= num_prefix and i not in merged]
    out_tokens = [tokens[i] for i in prefix] + [tokens[i] for i in kept_a]
    out_sizes = [sizes[i] for i in prefix] + [sizes[i] for i in kept_a]
    out_groups = [groups[i] for i in prefix] + [groups[i] for i in kept_a]
    for j in b_idx:
        if j < num_prefix:
            continue
        out_tokens.append(sums[j] / new_sizes[j])
        out_sizes.append(new_sizes[j])
        out_groups.append(new_groups[j])
    return out_tokens, out_sizes, out_groups


def tome_reference(tokens: List[torch.Tensor], sizes: List[float], groups: List[Set[int]], num_prefix: int, r: int
                   ) -> Tuple[List[torch.Tensor], List[float], List[Set[int]]]:
    """One layer of ToMe's bipartite soft matching as its paper describes it, written as loops: r is clamped to half
    of the non-prefix tokens; every A token (even position) draws an edge to its most similar B token (odd
    position); the r highest edges merge their A token into the B token (size-weighted mean; proportional
    attention reads the sizes). Output: prefix tokens, unmerged A tokens in A order, then the B tokens (ToMe's own
    order for at most a class token; further prefix tokens are kept in front too). With nothing to merge (r = 0
    after the clamp) the layer returns its input unchanged, as ToMe's does."""
    n = len(tokens)
    r = max(0, min(r, (n - num_prefix) // 2))
    if r == 0:
        return list(tokens), list(sizes), list(groups)
    edges = []
    for i in range(0, n, 2):
        if i < num_prefix:
            continue
        best_j, best_s = None, -float("inf")
        for j in range(1, n, 2):
            if j < num_prefix:
                continue
            s = _cos(tokens[i], tokens[j])
            if s > best_s:
                best_j, best_s = j, s
        if best_j is not None:
            edges.append((best_s, i, best_j))
    edges.sort(key=lambda e: -e[0])
    merged = {i: j for _, i, j in edges[:r]}
    value = {j: tokens[j] * sizes[j] for j in range(1, n, 2)}
    size = {j: sizes[j] for j in range(1, n, 2)}
    group = {j: set(groups[j]) for j in range(1, n, 2)}
    for i, j in merged.items():
        value[j] = value[j] + tokens[i] * sizes[i]
        size[j] += sizes[i]
        group[j] |= groups[i]
    order = list(range(num_prefix)) + [i for i in range(0, n, 2) if i >= num_prefix and i not in merged]
    out = ([tokens[i] for i in order], [sizes[i] for i in order], [groups[i] for i in order])
    for j in range(1, n, 2):
        if j >= num_prefix:
            out[0].append(value[j] / size[j])
            out[1].append(size[j])
            out[2].append(group[j])
    return out
