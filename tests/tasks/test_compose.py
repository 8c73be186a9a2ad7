"""Every registered visionzoo model builds into every task (on the meta device: no memory, no weights).

The model list is read at collection time, so a newly registered family is covered automatically; a
family that cannot be composed fails here under its own name.
"""
import pytest
import torch

import visionzoo
from visionzoo.tasks import DECODERS, DETECTORS, build_task_model

MODELS = visionzoo.list_models()
# tiny test_* variants get every head; the others rotate through the heads so each head meets each family
HEAD_KW = {
    "detection": dict(min_size=128, max_size=128, fpn_channels=32, representation_size=64, mask_head_channels=16),
    "segmentation": dict(decoder_channels=32),
}


def _combos(name):
    if name.startswith("test_"):
        return [("classification", None)] + [("detection", d) for d in DETECTORS] + [("segmentation", d) for d in DECODERS]
    i = MODELS.index(name)
    return [("classification", None), ("detection", DETECTORS[i % len(DETECTORS)]),
            ("segmentation", DECODERS[i % len(DECODERS)])]


def test_registry_is_populated():
    assert len(MODELS) > 0


@pytest.mark.parametrize("name", MODELS)
def test_compose_every_task_on_meta(name):
    for task, head in _combos(name):
        with torch.device("meta"):
            model = build_task_model(task, name, 5, head=head, **HEAD_KW.get(task, {}))
        params = list(model.parameters())
        assert params and all(p.is_meta for p in params), (name, task, head)
        if task != "classification":
            backbone = model.timm_model
            assert hasattr(backbone, "group_matcher"), f"{name}: no group_matcher for layer decay"


TEST_VARIANTS = [m for m in MODELS if m.startswith("test_")]


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_dense_forward_of_tiny_variants(name):
    """Real forward/backward of each family's tiny variant through one detector and one decoder."""
    i = TEST_VARIANTS.index(name)
    det = build_task_model("detection", name, 3, head=DETECTORS[i % len(DETECTORS)], **HEAD_KW["detection"],
                           anchor_sizes=(8, 16, 32, 64, 128))
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)} for _ in images]
    losses = det(images, targets)
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4

    seg = build_task_model("segmentation", name, 4, head=DECODERS[i % len(DECODERS)], **HEAD_KW["segmentation"])
    x = torch.rand(2, 3, 64, 64)
    losses = seg.loss(seg(x), torch.randint(0, 4, (2, 64, 64)))
    sum(losses.values()).backward()
    seg.eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 4, 64, 64)


def test_plain_backbone_gets_simple_feature_pyramid():
    from visionzoo.tasks import PyramidBackbone

    with torch.device("meta"):
        plain = PyramidBackbone("vim_small_stride8")  # stride 8: the stride-32 level is pooled
        hier = PyramidBackbone("test_patnet")
    assert plain.plain and plain.pyramid is not None and len(plain.extra_pools) == 1
    assert not hier.plain and hier.out_channels == [16, 32, 64, 128]
    out = PyramidBackbone("test_vim")(torch.rand(1, 3, 64, 64))
    assert [o.shape[-1] for o in out] == [16, 8, 4, 2]


def test_unknown_model_is_one_line_error():
    from visionzoo.data import InputError

    with pytest.raises(InputError, match="unknown model 'no_such_net'") as e:
        build_task_model("classification", "no_such_net", 3)
    assert "\n" not in str(e.value)
