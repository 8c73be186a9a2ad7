"""Dependency trees and unsupervised part segmentation from DependencyViT's reversed attention.

DependencyViT (Ding et al., CVPR 2023, arXiv 2304.03282) reads a dependency graph off each block:
child token ``i`` sends ``A[h, i, j] p[h, i] m[i]`` to parent ``j``; summed over heads this is the soft
dependency mask ``A^M[j, i]``, and the parent of ``i`` is ``argmax_j A^M[j, i]`` (§3, Fig. 1). Parts are
subtrees of the induced tree. This module turns a model's maps into:

* :func:`extract_dependencies` — per block, the parent of every patch (as a patch-grid index) and
  the message mass each patch receives, for any model with ``forward_dependencies``;
* :func:`induced_tree` — a rooted forest from one block's parents. "Send most to" graphs give every
  node one outgoing edge, so each connected component has exactly one cycle (often a 2-cycle or a
  self-loop); the cycle node that receives the most mass becomes the root, which is the smallest
  change that turns the graph into a tree (the paper does not say how it resolves cycles);
* :func:`segment_parts` — one label per patch: the subtree it belongs to, optionally split or merged
  to a requested number of parts;
* :func:`part_overlay` / :func:`save_part_overlay` — the labels blended over the image, with the
  tree's edges drawn, as a PIL image / PNG file (PIL only, no plotting library).

Tokens pruned before a block (DependencyViT-Lite) have no parent in it: parent ``-1`` and ``present``
False; they get label ``-1`` and are drawn untinted.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

__all__ = [
    "DependencyTree",
    "extract_dependencies",
    "parents_from_dependency",
    "induced_tree",
    "segment_parts",
    "dependency_parts",
    "part_overlay",
    "save_part_overlay",
]


@dataclass
class DependencyTree:
    """A rooted forest over the ``H*W`` patches of one image (raster order).

    Attributes:
        parent: (N,) long, the parent's patch index; ``-1`` for roots and for absent (pruned) patches.
        present: (N,) bool, whether the patch took part in the block.
        grid_size: (H, W) patch grid.
    """

    parent: Tensor
    present: Tensor
    grid_size: Tuple[int, int]

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    def roots(self) -> List[int]:
        return [i for i, (p, ok) in enumerate(zip(self.parent.tolist(), self.present.tolist())) if ok and p < 0]

    def children(self) -> List[List[int]]:
        kids: List[List[int]] = [[] for _ in range(self.num_nodes)]
        for i, p in enumerate(self.parent.tolist()):
            if p >= 0:
                kids[p].append(i)
        return kids

    def root_of(self) -> Tensor:
        """(N,) long: the root each patch hangs from (``-1`` for absent patches)."""
        parent = self.parent.tolist()
        present = self.present.tolist()
        out = [-1] * self.num_nodes
        for i in range(self.num_nodes):
            if not present[i] or out[i] >= 0:
                continue
            path = [i]
            while parent[path[-1]] >= 0 and out[path[-1]] < 0:
                path.append(parent[path[-1]])
            root = out[path[-1]] if out[path[-1]] >= 0 else path[-1]
            for node in path:
                out[node] = root
        return torch.tensor(out, dtype=torch.long)

    def depth(self) -> Tensor:
        """(N,) long: edges from each patch up to its root (0 for roots, ``-1`` for absent patches)."""
        parent = self.parent.tolist()
        out = [-1] * self.num_nodes
        for i in range(self.num_nodes):
            if not self.present[i]:
                continue
            path = [i]
            while parent[path[-1]] >= 0 and out[path[-1]] < 0:
                path.append(parent[path[-1]])
            base = out[path[-1]] if out[path[-1]] >= 0 else 0
            for k, node in enumerate(reversed(path)):
                if out[node] < 0:
                    out[node] = base + k
        return torch.tensor(out, dtype=torch.long)

    def subtree_sizes(self) -> Tensor:
        """(N,) long: number of patches in each patch's subtree, itself included (0 for absent)."""
        sizes = self.present.long().clone()
        depth = self.depth().tolist()
        parent = self.parent.tolist()
        for i in sorted(range(self.num_nodes), key=lambda n: -depth[n]):
            if depth[i] > 0:
                sizes[parent[i]] += sizes[i]
        return sizes


def parents_from_dependency(dependency: Tensor, token_index: Tensor, num_tokens: int) -> Tuple[Tensor, Tensor]:
    """Parents and received mass on the full patch grid from one block's dependency map.

    Args:
        dependency: (B, n, n), ``[b, j, i]`` = what token ``i`` sends to token ``j``.
        token_index: (B, n) patch-grid position of each of the ``n`` tokens.
        num_tokens: patches in the grid (H*W).

    Returns:
        ``parents`` (B, num_tokens) long, the grid index of each patch's parent (``-1`` for patches not
        among the ``n``), and ``mass`` (B, num_tokens), what each patch receives (0 if absent).
    """
    if dependency.dim() != 3 or dependency.shape[1] != dependency.shape[2]:
        raise ValueError(f"dependency must be (B, n, n), got {tuple(dependency.shape)}")
    if token_index.shape != dependency.shape[:2]:
        raise ValueError(f"token_index must be (B, n) = {tuple(dependency.shape[:2])}, got {tuple(token_index.shape)}")
    B = dependency.shape[0]
    local_parent = dependency.argmax(dim=1)  # (B, n): for each child i, argmax over parents j
    grid_parent = token_index.gather(1, local_parent)
    parents = torch.full((B, num_tokens), -1, dtype=torch.long, device=dependency.device)
    parents.scatter_(1, token_index, grid_parent)
    mass = dependency.new_zeros(B, num_tokens).scatter_(1, token_index, dependency.sum(dim=-1))
    return parents, mass


@torch.no_grad()
def extract_dependencies(
    model: nn.Module,
    images: Tensor,
    layers: Optional[Union[int, Sequence[int]]] = None,
) -> Dict[str, Any]:
    """Run ``model.forward_dependencies`` (eval mode, no grad) and map everything to the patch grid.

    Args:
        model: a DependencyViT (anything with ``forward_dependencies``).
        images: (B, C, H, W), normalised as the model expects.
        layers: block indices (negative counts from the end), the last n if an int, all if None.

    Returns:
        dict with ``parents`` and ``mass`` (lists over the chosen blocks of (B, H*W) tensors, see
        :func:`parents_from_dependency`), the raw ``dependency`` / ``token_index`` lists,
        ``grid_size`` (H, W) and ``layers`` (block indices).
    """
    if not hasattr(model, "forward_dependencies"):
        raise ValueError(f"{type(model).__name__} has no forward_dependencies(); use a DependencyViT model")
    depth = len(model.blocks)
    if isinstance(layers, int):
        if not 0 < layers <= depth:
            raise ValueError(f"layers={layers}: the last n blocks needs 1 <= n <= {depth}")
    elif layers is not None:
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {depth} blocks")
        layers = [i % depth for i in layers]
    was_training = model.training
    model.eval()
    try:
        out = model.forward_dependencies(images, indices=layers)
    finally:
        model.train(was_training)
    num_tokens = out["grid_size"][0] * out["grid_size"][1]
    parents, masses = [], []
    for dep, idx in zip(out["dependency"], out["token_index"]):
        p, mass = parents_from_dependency(dep, idx, num_tokens)
        parents.append(p)
        masses.append(mass)
    out.update(parents=parents, mass=masses)
    return out


def induced_tree(parents: Tensor, grid_size: Tuple[int, int], mass: Optional[Tensor] = None) -> DependencyTree:
    """The rooted forest of one image: ``parents`` (H*W,) from :func:`parents_from_dependency`.

    Each cycle of the "sends most to" graph is broken at the node with the largest ``mass`` (ties, or no
    ``mass``: the smallest index), which becomes a root.
    """
    if parents.dim() != 1 or parents.numel() != grid_size[0] * grid_size[1]:
        raise ValueError(f"parents must be (H*W,) = ({grid_size[0] * grid_size[1]},) for grid {tuple(grid_size)}, "
                         f"got {tuple(parents.shape)}; pass one image at a time")
    parent = parents.tolist()
    n = len(parent)
    present = [p >= 0 for p in parent]
    weight = mass.tolist() if mass is not None else [0.0] * n
    for i in range(n):  # a parent that is absent cannot happen with model output; treat it as a root
        if present[i] and not present[parent[i]]:
            parent[i] = -1
    state = [0] * n  # 0 new, 1 on the current walk, 2 done
    for start in range(n):
        if not present[start] or state[start]:
            continue
        path = []
        node = start
        while node >= 0 and state[node] == 0:
            state[node] = 1
            path.append(node)
            node = parent[node]
        if node >= 0 and state[node] == 1:  # closed a cycle: node ... path[-1] -> node
            cycle = path[path.index(node):]
            root = max(cycle, key=lambda c: (weight[c], -c))
            parent[root] = -1
        for v in path:
            state[v] = 2
    return DependencyTree(
        parent=torch.tensor(parent, dtype=torch.long),
        present=torch.tensor(present, dtype=torch.bool),
        grid_size=(int(grid_size[0]), int(grid_size[1])),
    )


def segment_parts(tree: DependencyTree, num_parts: Optional[int] = None) -> Tensor:
    """Part labels (N,) from subtrees: 0 for the largest part, 1 for the next, ..., ``-1`` for absent patches.

    Without ``num_parts`` every tree of the forest is one part. With it, while there are too few parts
    the largest part that branches is split at its first branching node into the subtrees of that
    node's children (the chain from the part's top down to the branching node joins the largest, under
    its top, which re-roots that part); a part that is a chain is not split. If there are too many
    parts, the smallest ones are merged into an "other" part, which takes the last label.
    """
    if num_parts is not None and num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    children = tree.children()
    top_of = tree.root_of().tolist()  # part id = the top node of the part's subtree
    members: Dict[int, List[int]] = {}
    for i, t in enumerate(top_of):
        if t >= 0:
            members.setdefault(t, []).append(i)

    def subtree(node: int) -> List[int]:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            out.append(v)
            stack.extend(children[v])
        return out

    def branch_point(top: int) -> int:
        """First node at or below ``top`` with two or more children (-1 if the part is a chain)."""
        node = top
        while len(children[node]) == 1:
            node = children[node][0]
        return node if children[node] else -1

    if num_parts is not None:
        while len(members) < num_parts:
            splittable = [t for t in members if branch_point(t) >= 0]
            if not splittable:
                break
            top = max(splittable, key=lambda t: (len(members[t]), -t))
            branch = branch_point(top)
            del members[top]
            pieces = {c: subtree(c) for c in children[branch]}
            largest = max(pieces, key=lambda c: (len(pieces[c]), -c))
            # The chain top..branch becomes a leaf chain under the largest child, which is now that
            # part's top, so every part stays exactly the subtree of its top in the re-rooted forest.
            children[branch] = []
            children[largest].append(top)
            pieces[largest] = pieces[largest] + subtree(top)
            members.update(pieces)
        if len(members) > num_parts:
            ordered = sorted(members, key=lambda t: (-len(members[t]), t))
            rest = [i for t in ordered[num_parts - 1:] for i in members.pop(t)]
            members[-1] = rest  # "other"
    labels = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    order = sorted((t for t in members if t >= 0), key=lambda t: (-len(members[t]), t))
    for label, top in enumerate(order + ([-1] if -1 in members else [])):  # "other" comes last
        labels[members[top]] = label
    return labels


def dependency_parts(
    model: nn.Module,
    images: Tensor,
    layer: int = -1,
    num_parts: Optional[int] = None,
) -> Tuple[Tensor, List[DependencyTree]]:
    """Part segmentation of a batch from one block's dependency tree.

    Returns ``labels`` (B, H, W) long on the patch grid (``-1`` = pruned before ``layer``) and the trees.
    """
    deps = extract_dependencies(model, images, layers=[layer])
    grid = deps["grid_size"]
    trees, labels = [], []
    for parents, mass in zip(deps["parents"][0].cpu(), deps["mass"][0].cpu()):
        tree = induced_tree(parents, grid, mass)
        trees.append(tree)
        labels.append(segment_parts(tree, num_parts).reshape(grid))
    return torch.stack(labels), trees


def _palette(n: int) -> List[Tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.61803398875 * k) % 1.0, 0.75, 0.95)) for k in range(n)]


def _to_pil(image: Union[Image.Image, Tensor]) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError("image must be a PIL image or a (C, H, W) tensor with C in (1, 3)")
    x = image.detach().cpu()
    if x.is_floating_point():
        x = (x.clamp(0, 1) * 255).round()
    x = x.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).contiguous()
    return Image.fromarray(x.numpy(), mode="RGB")


def part_overlay(
    image: Union[Image.Image, Tensor],
    labels: Tensor,
    tree: Optional[DependencyTree] = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend part ``labels`` (H_p, W_p) over ``image`` (PIL, or (C, H, W) in [0, 1] / uint8).

    Each patch is tinted with its part's colour (``-1`` patches are left as they are). With ``tree``,
    every child-to-parent edge is drawn as a line between patch centres and roots as circles.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (H_p, W_p), got {tuple(labels.shape)}")
    base = _to_pil(image)
    W, H = base.size
    gh, gw = labels.shape
    num = int(labels.max().item()) + 1 if labels.numel() else 0
    colours = _palette(max(num, 1))
    tint = Image.new("RGB", (gw, gh))
    mask = Image.new("L", (gw, gh))
    tint.putdata([colours[v] if v >= 0 else (0, 0, 0) for v in labels.flatten().tolist()])
    mask.putdata([int(255 * alpha) if v >= 0 else 0 for v in labels.flatten().tolist()])
    out = Image.composite(tint.resize((W, H), Image.NEAREST), base, mask.resize((W, H), Image.NEAREST))
    if tree is not None:
        if tuple(tree.grid_size) != (gh, gw):
            raise ValueError(f"tree grid {tree.grid_size} does not match labels {(gh, gw)}")
        draw = ImageDraw.Draw(out)
        sx, sy = W / gw, H / gh

        def centre(i: int) -> Tuple[float, float]:
            return ((i % gw + 0.5) * sx, (i // gw + 0.5) * sy)

        for i, p in enumerate(tree.parent.tolist()):
            if p >= 0:
                draw.line([centre(i), centre(p)], fill=(255, 255, 255), width=1)
        r = max(2.0, min(sx, sy) / 4)
        for root in tree.roots():
            cx, cy = centre(root)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), fill=(255, 255, 255))
    return out


def save_part_overlay(
    path: str,
    image: Union[Image.Image, Tensor],
    labels: Tensor,
    tree: Optional[DependencyTree] = None,
    alpha: float = 0.5,
) -> Image.Image:
    """:func:`part_overlay` written to ``path`` as PNG; returns the image."""
    out = part_overlay(image, labels, tree, alpha)
    out.save(path, format="PNG")
    return out
