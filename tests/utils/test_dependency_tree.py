"""visionzoo.utils.dependency_tree: parents from maps, tree induction (cycle breaking), part
segmentation, extraction from a (pruned) model, the PNG overlay and the example script."""
import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import visionzoo  # noqa: F401
from visionzoo.utils.dependency_tree import (
    DependencyTree, dependency_parts, extract_dependencies, induced_tree, parents_from_dependency,
    part_overlay, save_part_overlay, segment_parts,
)

ROOT = Path(__file__).resolve().parents[2]


def test_parents_from_dependency_maps_to_grid():
    # 3 tokens present (grid positions 4, 0, 2 of 5); dep[b, j, i] = what i sends to j.
    dep = torch.tensor([[[0.1, 0.7, 0.0], [0.8, 0.2, 0.1], [0.1, 0.1, 0.9]]])
    idx = torch.tensor([[4, 0, 2]])
    parents, mass = parents_from_dependency(dep, idx, 5)
    # child 0 (pos 4) -> parent 1 (pos 0); child 1 (pos 0) -> parent 0 (pos 4); child 2 (pos 2) -> itself.
    assert parents.tolist() == [[4, -1, 2, -1, 0]]
    torch.testing.assert_close(mass, torch.tensor([[1.1, 0.0, 1.1, 0.0, 0.8]]))
    with pytest.raises(ValueError):
        parents_from_dependency(dep[0], idx, 5)


def test_induced_tree_breaks_cycles_at_the_heaviest_node():
    # 0 <-> 1 (2-cycle), 2 -> 1, 3 -> 3 (self-loop), 4 -> 3, 5 absent.
    parents = torch.tensor([1, 0, 1, 3, 3, -1])
    mass = torch.tensor([2.0, 1.0, 0.0, 0.5, 0.0, 0.0])
    tree = induced_tree(parents, (2, 3), mass)
    assert tree.parent.tolist() == [-1, 0, 1, -1, 3, -1]
    assert tree.present.tolist() == [True] * 5 + [False]
    assert tree.roots() == [0, 3]
    assert tree.root_of().tolist() == [0, 0, 0, 3, 3, -1]
    assert tree.depth().tolist() == [0, 1, 2, 0, 1, -1]
    assert tree.subtree_sizes().tolist() == [3, 2, 1, 2, 1, 0]
    assert induced_tree(parents, (2, 3)).parent.tolist()[:2] == [-1, 0]  # no mass: smallest index
    with pytest.raises(ValueError, match="one image"):
        induced_tree(parents[None], (2, 3))


def test_induced_tree_of_a_long_cycle_is_a_chain():
    n = 9
    parents = torch.roll(torch.arange(n), -1)  # i -> i + 1, 8 -> 0
    tree = induced_tree(parents, (3, 3), torch.arange(n, dtype=torch.float))
    assert tree.roots() == [8]
    assert tree.depth().tolist() == list(range(8, -1, -1))


def _chain_tree():
    #        0
    #      / | \
    #     1  2  3        1 has children 4, 5; 4 has 6; 3 has 7; 8 is a second root
    #    / \
    #   4   5
    #   |
    #   6
    parent = torch.tensor([-1, 0, 0, 0, 1, 1, 4, 3, -1])
    return DependencyTree(parent, torch.ones(9, dtype=torch.bool), (3, 3))


def test_segment_parts_forest_split_and_merge():
    tree = _chain_tree()
    assert segment_parts(tree).tolist() == [0] * 8 + [1]
    # Three parts: split the big tree at its root: {1,4,5,6}+0, {2}, {3,7}; the 4th (smallest) merges.
    labels = segment_parts(tree, num_parts=3).tolist()
    assert labels[0] == labels[1] == labels[4] == labels[5] == labels[6] == 0
    assert labels[3] == labels[7] == 1
    assert labels[2] == labels[8] == 2  # "other": {2} and {8}
    assert segment_parts(tree, num_parts=1).tolist() == [0] * 9
    many = segment_parts(tree, num_parts=50).tolist()
    assert sorted(set(many)) == list(range(max(many) + 1)) and 7 <= len(set(many)) <= 9  # terminates
    with pytest.raises(ValueError):
        segment_parts(tree, num_parts=0)


def test_extract_dependencies_from_a_pruned_model():
    model = timm.create_model("test_dependencyvit_lite").train()
    x = torch.randn(2, 3, 64, 64)
    deps = extract_dependencies(model, x)
    assert model.training  # mode restored
    assert deps["layers"] == [0, 1, 2] and deps["grid_size"] == (4, 4)
    present = [int((p[0] >= 0).sum()) for p in deps["parents"]]
    assert present == [16, 16, 12]
    for p, idx in zip(deps["parents"], deps["token_index"]):
        kept = p >= 0
        assert kept.gather(1, idx).all() and (p[kept] < 16).all()
        # a parent is always a token of the same block
        assert kept.gather(1, p.clamp(min=0)).all()
    only = extract_dependencies(model, x, layers=[-1])
    assert only["layers"] == [2]
    torch.testing.assert_close(only["parents"][0], deps["parents"][2])
    with pytest.raises(ValueError):
        extract_dependencies(model, x, layers=[3])
    with pytest.raises(ValueError, match="forward_dependencies"):
        extract_dependencies(torch.nn.Linear(2, 2), x)


def test_dependency_parts_and_overlay(tmp_path):
    model = timm.create_model("test_dependencyvit").eval()
    labels, trees = dependency_parts(model, torch.randn(2, 3, 64, 64), num_parts=3)
    assert labels.shape == (2, 4, 4) and len(trees) == 2
    assert labels.min() >= 0 and labels.max() <= 2
    image = torch.rand(3, 64, 64)
    out = save_part_overlay(str(tmp_path / "parts.png"), image, labels[0], trees[0])
    reread = Image.open(tmp_path / "parts.png")
    assert reread.format == "PNG" and reread.size == (64, 64)
    assert out.size == (64, 64)
    plain = part_overlay(Image.new("RGB", (64, 32), (0, 0, 0)), torch.full((2, 4), -1), alpha=0.5)
    assert plain.getextrema() == ((0, 0), (0, 0), (0, 0))  # -1 patches stay untinted
    tinted = part_overlay(Image.new("RGB", (64, 32), (0, 0, 0)), torch.zeros(2, 4, dtype=torch.long))
    assert max(c[1] for c in tinted.getextrema()) > 0
    with pytest.raises(ValueError):
        part_overlay(image, labels)  # a batch of labels
    with pytest.raises(ValueError, match="grid"):
        part_overlay(image, labels[0][:2], trees[0])


def test_example_script_writes_png(tmp_path, monkeypatch, capsys):
    out = tmp_path / "example.png"
    monkeypatch.setattr(sys, "argv", ["dependency_tree.py", str(out), "--model", "test_dependencyvit_lite",
                                      "--parts", "3"])
    runpy.run_path(str(ROOT / "examples" / "dependency_tree.py"), run_name="__main__")
    assert Image.open(out).size == (64, 64)
    assert "12 of 16 patches" in capsys.readouterr().out
