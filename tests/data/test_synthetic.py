import torch

from visionzoo.data import SyntheticClassification, SyntheticDetection, SyntheticSegmentation, SyntheticShapes


def test_deterministic_and_consistent():
    gen = SyntheticShapes(num_classes=3, img_size=64, num_objects=(1, 3), seed=5)
    a, b = gen.sample(7), gen.sample(7)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], gen.sample(8)["image"])
    for i in range(20):
        s = gen.sample(i)
        assert s["image"].shape == (3, 64, 64) and 0 <= s["image"].min() and s["image"].max() <= 1
        assert len(s["labels"]) == len(s["boxes"]) == len(s["masks"])
        for box, mask, label in zip(s["boxes"], s["masks"], s["labels"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert (s["semantic"][mask.bool()] == label + 1).all()  # visible instance pixels carry its class


def test_task_views():
    x, y = SyntheticClassification(10, num_classes=4, img_size=32)[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 4
    img, t = SyntheticDetection(10, num_classes=3, img_size=32)[2]
    assert t["labels"].min() >= 1 and t["boxes"].shape[1] == 4
    img, sem = SyntheticSegmentation(10, num_classes=3, img_size=32)[1]
    assert sem.dtype == torch.int64 and sem.max() <= 3
    assert SyntheticSegmentation(10, num_classes=3).num_classes == 4
