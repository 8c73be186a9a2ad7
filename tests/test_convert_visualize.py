"""tools/convert.py (official files -> visionzoo safetensors, checksums, one-line errors), the checkpoint
manifest, and tools/visualize.py (every picture renders to a valid PNG)."""
import argparse
from pathlib import Path

import pytest
import timm
import torch
import yaml

import visionzoo  # noqa: F401
from visionzoo.cli import convert, visualize
from visionzoo.models import VISIONZOO_MODELS

from .models.overlock_official import OFFICIAL_CFGS, official_overlock_forward
from .models.overlock_official import to_official as overlock_to_official
from .models.test_biformer import _to_official as biformer_to_official
from .models.test_patnet import _to_official as patnet_to_official
from .models.test_vim import _to_official as vim_to_official
from .models.vim_official import official_vim_forward

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "checkpoints" / "manifest.yaml"


@torch.no_grad()
def _randomised(name, seed=0, **kwargs):
    """A model whose every weight and BN statistic is off its init (so a wrong mapping shows)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    for key, t in model.state_dict().items():
        if key.endswith("running_var"):
            t.uniform_(0.5, 1.5)
        elif t.is_floating_point():
            t.add_(0.05 * torch.randn_like(t))
    return model


def _official_files(tmp_path):
    """Official-layout files of every family's test model: name -> (file, source model)."""
    files = {}

    vim = _randomised("test_vim")
    ema = _randomised("test_vim", seed=1)
    torch.save({"model": vim_to_official(vim.state_dict()), "model_ema": vim_to_official(ema.state_dict()),
                "optimizer": {}, "lr_scheduler": {}, "epoch": 299, "scaler": {},
                "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2", lr=5e-4)}, tmp_path / "vim.pth")
    files["test_vim"] = (tmp_path / "vim.pth", vim)

    biformer = _randomised("test_biformer")
    torch.save({"model": biformer_to_official(biformer.state_dict()), "epoch": 299,
                "args": argparse.Namespace(model="biformer_tiny")}, tmp_path / "biformer.pth")
    files["test_biformer"] = (tmp_path / "biformer.pth", biformer)

    overlock = _randomised("test_overlock", deploy=False, use_aux_head=True)  # the release's training form
    torch.save({"model": overlock_to_official(overlock.state_dict())}, tmp_path / "overlock.pth")
    files["test_overlock"] = (tmp_path / "overlock.pth", overlock)

    patnet = _randomised("test_patnet")  # released .pth files are a bare state dict
    torch.save(patnet_to_official(patnet.state_dict()), tmp_path / "patnet.pth")
    files["test_patnet"] = (tmp_path / "patnet.pth", patnet)

    dvit = _randomised("test_dependencyvit")  # no official weights: a DDP training file of the same keys
    torch.save({"model": {"module." + k: v for k, v in dvit.state_dict().items()}, "epoch": 1},
               tmp_path / "dependencyvit.pth")
    files["test_dependencyvit"] = (tmp_path / "dependencyvit.pth", dvit)

    sparsifiner = _randomised("test_sparsifiner")  # the official model's keys, {"model": ...}
    torch.save({"model": dict(sparsifiner.state_dict()), "optimizer": {}, "epoch": 49}, tmp_path / "sparsifiner.pth")
    files["test_sparsifiner"] = (tmp_path / "sparsifiner.pth", sparsifiner)
    return files


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return _official_files(tmp_path_factory.mktemp("official"))


def _converted(name, path, tmp_path, *extra):
    out = tmp_path / f"{name}.safetensors"
    info = convert.main([name, str(path), str(out), *extra])
    assert out.is_file() and info["output"] == str(out)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(out)}).eval()
    return model, info


def _error(capsys, argv):
    """Run convert expecting failure; return its message after checking it is a single line."""
    with pytest.raises(SystemExit) as exc:
        convert.main(argv)
    msg = exc.value.code
    assert isinstance(msg, str) and msg.startswith("convert: ") and "\n" not in msg, msg
    assert "Traceback" not in capsys.readouterr().err
    return msg


# --- conversion of official layouts -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_vim", "test_biformer", "test_overlock", "test_patnet",
                                  "test_dependencyvit", "test_sparsifiner"])
def test_official_file_converts_and_reloads_strictly(official, tmp_path, name):
    path, src = official[name]
    model, info = _converted(name, path, tmp_path)
    assert info["manifest_tag"] is None and not info["checksum_verified"]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / f"{name}.safetensors"))
    assert set(saved) == set(model.state_dict())  # strict: exactly the model's keys
    result = model.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = src(x), model(x)
    assert ref.abs().max() > 0.1
    # OverLoCK folds the training form's dilated branches into one kernel: equal up to float rounding.
    tol = 2e-4 if name == "test_overlock" else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_converted_vim_matches_the_official_forward(official, tmp_path):
    path, _ = official["test_vim"]
    model, _ = _converted("test_vim", path, tmp_path)
    sd = vim_to_official(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_vim_forward(sd, x), rtol=1e-4, atol=1e-4)


def test_converted_overlock_matches_the_official_forward(official, tmp_path):
    path, _ = official["test_overlock"]
    model, _ = _converted("test_overlock", path, tmp_path)
    official_sd = torch.load(path, weights_only=True)["model"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, _ = official_overlock_forward(official_sd, x, OFFICIAL_CFGS["test_overlock"])
        torch.testing.assert_close(model(x), ref, rtol=2e-4, atol=2e-4)


def test_real_variant_official_file(tmp_path):
    """A full-size variant (vim_tiny, 24 blocks) in the official training-state layout."""
    src = _randomised("vim_tiny")
    torch.save({"model": vim_to_official(src.state_dict()), "args": argparse.Namespace(lr=1.0)},
               tmp_path / "vim_t_midclstok_76p1acc.pth")
    model, info = _converted("vim_tiny", tmp_path / "vim_t_midclstok_76p1acc.pth", tmp_path)
    assert info["manifest_tag"] == "vim_tiny.in1k"  # found by file name; the manifest has no hash yet
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_ema_weights(official, tmp_path):
    path, _ = official["test_vim"]
    with pytest.raises(SystemExit, match="no EMA weights tag"):
        convert.main(["test_biformer", str(path), str(tmp_path / "x.safetensors"), "--ema"])
    ckpt = torch.load(path, weights_only=False)
    # test_vim has no _ema tag either; the EMA branch is checked on vim_tiny's tag
    src, ema = _randomised("vim_tiny"), _randomised("vim_tiny", seed=1)
    torch.save({"model": vim_to_official(src.state_dict()), "model_ema": vim_to_official(ema.state_dict()),
                "args": ckpt["args"]}, tmp_path / "vim_t.pth")
    model, _ = _converted("vim_tiny", tmp_path / "vim_t.pth", tmp_path, "--ema")
    torch.testing.assert_close(model.state_dict()["blocks.0.mixer.A_log"], ema.state_dict()["blocks.0.mixer.A_log"])


# --- checksums ------------------------------------------------------------------------------------------
def _manifest(tmp_path, path, **fields):
    entry = {"family": "vim", "variant": "test_vim", "source": "hf:none/none", "file": path.name, "sha256": None,
                 "key_format": "vim", "container": "training state", "paper_metric": None}
    entry.update(fields)
    out = tmp_path / "manifest.yaml"
    out.write_text(yaml.safe_dump({"checkpoints": {"test_vim.in1k": entry}}))
    return str(out)


def test_checksum_from_the_manifest(official, tmp_path, capsys):
    path, _ = official["test_vim"]
    digest = convert.sha256_of(path)
    good = _manifest(tmp_path, path, sha256=digest)
    info = convert.main(["test_vim", str(path), str(tmp_path / "a.safetensors"), "--manifest", good])
    assert info["checksum_verified"] and info["manifest_tag"] == "test_vim.in1k"
    assert "checksum ok" in capsys.readouterr().out

    bad = _manifest(tmp_path, path, sha256="0" * 64)
    msg = _error(capsys, ["test_vim", str(path), str(tmp_path / "b.safetensors"), "--manifest", bad])
    assert "does not match the manifest's test_vim.in1k" in msg and digest in msg
    assert not (tmp_path / "b.safetensors").exists()
    info = convert.main(["test_vim", str(path), str(tmp_path / "b.safetensors"), "--manifest", bad, "--no-verify"])
    assert not info["checksum_verified"]

    prefix_ok = _manifest(tmp_path, path, sha256_prefix=digest[:8])
    assert convert.main(["test_vim", str(path), str(tmp_path / "c.safetensors"), "--manifest", prefix_ok])[
        "checksum_verified"]
    prefix_bad = _manifest(tmp_path, path, sha256_prefix="ffffffff" if not digest.startswith("f") else "00000000")
    assert "published prefix" in _error(capsys, ["test_vim", str(path), str(tmp_path / "d.safetensors"),
                                                 "--manifest", prefix_bad])


def test_tag_selects_the_entry(official, tmp_path, capsys):
    path, _ = official["test_vim"]
    manifest = _manifest(tmp_path, Path("another_name.pth"), sha256="1" * 64)
    info = convert.main(["test_vim", str(path), str(tmp_path / "a.safetensors"), "--manifest", manifest])
    assert info["manifest_tag"] is None  # the file's name is not the entry's
    assert "not in the manifest" in capsys.readouterr().out
    assert "does not match" in _error(capsys, ["test_vim", str(path), str(tmp_path / "b.safetensors"),
                                               "--manifest", manifest, "--tag", "test_vim.in1k"])
    assert "not test_biformer" in _error(capsys, ["test_biformer", str(path), str(tmp_path / "b.safetensors"),
                                                  "--manifest", manifest, "--tag", "test_vim.in1k"])


# --- bad input: one line each ---------------------------------------------------------------------------
def test_truncated_file_is_one_line(official, tmp_path, capsys):
    path, _ = official["test_vim"]
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        bad = tmp_path / "cut.pth"
        bad.write_bytes(data[:cut])
        msg = _error(capsys, ["test_vim", str(bad), str(tmp_path / "out.safetensors")])
        assert "truncated or not a checkpoint" in msg and f"{cut:,} bytes" in msg
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_safetensors_is_one_line(official, tmp_path, capsys):
    path, _ = official["test_patnet"]
    good = tmp_path / "patnet.safetensors"
    convert.main(["test_patnet", str(path), str(good)])
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-64])
    assert "truncated or not a checkpoint" in _error(capsys, ["test_patnet", str(bad), str(tmp_path / "o.pth")])


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    assert "truncated or not a checkpoint" in _error(capsys, ["test_vim", str(text), str(tmp_path / "o.safetensors")])
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in _error(capsys, ["test_vim", str(tmp_path / "list.pth"),
                                                               str(tmp_path / "o.safetensors")])
    torch.save({"epoch": 3, "args": {}}, tmp_path / "empty.pth")
    assert "holds no weights" in _error(capsys, ["test_vim", str(tmp_path / "empty.pth"),
                                                 str(tmp_path / "o.safetensors")])
    assert "no such file" in _error(capsys, ["test_vim", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")])
    assert "unknown model" in _error(capsys, ["vim_huge", str(text), str(tmp_path / "o.safetensors")])
    assert "must end in .safetensors" in _error(capsys, ["test_vim", str(text), str(tmp_path / "o.bin")])


@pytest.mark.parametrize("model,other", [("test_vim", "test_biformer"), ("test_biformer", "test_overlock"),
                                         ("test_overlock", "test_patnet"), ("test_patnet", "test_vim"),
                                         ("test_dependencyvit", "test_sparsifiner"),
                                         ("test_sparsifiner", "test_dependencyvit")])
def test_another_familys_checkpoint_is_one_line(official, tmp_path, capsys, model, other):
    path, _ = official[other]
    msg = _error(capsys, [model, str(path), str(tmp_path / "o.safetensors")])
    assert f"holds a {VISIONZOO_MODELS[other].family} checkpoint" in msg and f"not one for {model}" in msg


def test_missing_keys_and_other_variant_are_one_line(official, tmp_path, capsys):
    path, _ = official["test_vim"]
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"]["layers.1.mixer.A_log"]
    torch.save(ckpt, tmp_path / "missing.pth")
    msg = _error(capsys, ["test_vim", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")])
    assert "does not load into test_vim" in msg and "blocks.1.mixer.A_log" in msg
    wide = _randomised("test_vim", embed_dim=48)
    torch.save({"model": vim_to_official(wide.state_dict())}, tmp_path / "wide.pth")
    msg = _error(capsys, ["test_vim", str(tmp_path / "wide.pth"), str(tmp_path / "o.safetensors")])
    assert "size mismatch for" in msg and "another variant" in msg


# --- the manifest ---------------------------------------------------------------------------------------
def test_manifest_entries_are_complete_and_consistent():
    manifest = convert.load_manifest(MANIFEST)
    for tag, entry in manifest.items():
        variant = tag.split(".")[0]
        assert entry["variant"] == variant, tag
        assert variant in VISIONZOO_MODELS and entry["family"] == VISIONZOO_MODELS[variant].family, tag
        assert entry["sha256"] is None or (len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0), tag
        assert entry["paper_metric"] is None or all(isinstance(v, float) for v in entry["paper_metric"].values())
        assert entry["source"].startswith(("https://", "hf:")), tag
        if tag in timm.list_pretrained(variant + ".*"):  # same source as the registered pretrained cfg
            cfg = timm.models.get_pretrained_cfg(tag)
            assert entry["source"] == (f"hf:{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url), tag
            if cfg.hf_hub_filename:
                assert entry["file"] == cfg.hf_hub_filename, tag
        if entry.get("sha256_prefix"):
            assert f"-{entry['sha256_prefix']}." in entry["file"], tag


# --- tools/visualize.py ---------------------------------------------------------------------------------
TEST_MODELS = {what: f"test_{family}" for what, (family, _, _) in visualize.PICTURES.items()}


def _check_png(path):
    from PIL import Image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 250
        pixels = torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8).float()
    assert pixels.std() > 20  # a picture, not a blank canvas


@pytest.mark.parametrize("what", list(visualize.PICTURES))
def test_each_picture_renders_a_png(tmp_path, what):
    out = visualize.render(what, tmp_path / f"{what}.png", model=TEST_MODELS[what])
    _check_png(out)


def _input(name):
    model = visualize.build_model(name)
    photo = visualize.load_photo("astronaut", visualize.image_size(model, None))
    assert photo.shape == (64, 64, 3) and photo.dtype.name == "uint8"
    return model, visualize.to_input(model, photo)


def test_biformer_routing_data():
    model, x = _input("test_biformer")
    calls = visualize.biformer_routing(model, x)
    assert [c["stage"] for c in calls] == [0, 1, 2, 2]  # one per BRA block; the last stage is global
    for c in calls:
        n = c["n_win"][0] * c["n_win"][1]
        assert c["idx"].shape == (n, c["topk"])
        assert all(len(set(row)) == c["topk"] and max(row) < n for row in c["idx"].tolist())


def test_sparsifiner_connections_data():
    model, x = _input("test_sparsifiner")
    kept = visualize.sparsifiner_connections(model, x)
    assert len(kept) == len(model.blocks)
    n = model.grid_size[0] * model.grid_size[1] + 1
    assert kept[0].shape[1] == n - 1  # every patch token queries in the first block
    for k in kept:  # test_sparsifiner prunes tokens: later blocks have fewer query rows
        heads, rows, budget = k.shape
        assert heads == model.blocks[0].attn.num_heads and rows <= n - 1 and budget <= rows + 1
        assert all(len(set(r)) == budget for r in k.reshape(-1, budget).tolist()) and int(k.max()) < n


def test_overlock_kernels_data():
    model, x = _input("test_overlock")
    calls = visualize.overlock_kernels(model, x)
    assert len(calls) == 2 * (len(model.sub_blocks3) + len(model.sub_blocks4))
    for c in calls:
        assert c["attn"].shape[-1] == c["K"] ** 2
        torch.testing.assert_close(c["attn"].sum(-1), torch.ones(c["attn"].shape[:-1]))


def test_vim_erf_peaks_at_the_centre_token():
    model, x = _input("test_vim")
    erfs = visualize.vim_erf(model, x, [0, 2])
    for erf in erfs:
        assert erf.shape == (64, 64) and erf.max() > 0
        y, xx = divmod(int(erf.argmax()), 64)
        assert 32 <= y < 48 and 32 <= xx < 48  # inside the centre token's 16x16 patch (grid 4x4, token (2, 2))


def test_cli_single_picture_with_a_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    src = _randomised("test_vim", seed=3)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = visualize.build_model("test_vim", str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(loaded.state_dict()["blocks.1.mixer.A_log"], src.state_dict()["blocks.1.mixer.A_log"])
    paths = visualize.main(["--what", "vim_erf", "--model", "test_vim", "--out", str(tmp_path / "erf.png"),
                            "--checkpoint", str(tmp_path / "w.safetensors"), "--image", "chelsea",
                            "--point", "0.5", "0.5"])
    _check_png(paths[0])
    assert "wrote" in capsys.readouterr().out


def test_cli_all(tmp_path, monkeypatch):
    """--what all: one PNG per picture (two pictures here, with test models; each is rendered above)."""
    for what, (family, _, draw) in list(visualize.PICTURES.items()):
        if what in ("sparsifiner_connections", "vim_erf"):
            monkeypatch.setitem(visualize.PICTURES, what, (family, TEST_MODELS[what], draw))
        else:
            monkeypatch.delitem(visualize.PICTURES, what)
    paths = visualize.main(["--what", "all", "--out", str(tmp_path / "pictures")])
    assert sorted(p.name for p in paths) == sorted(f"{w}.png" for w in visualize.PICTURES)
    for p in paths:
        _check_png(p)


@pytest.mark.parametrize("argv,expected", [
    (["--what", "vim_erf", "--model", "test_biformer"], "needs a vim model, test_biformer is biformer"),
    (["--what", "routing", "--model", "test_vim"], "unknown --what 'routing'"),
    (["--what", "all", "--model", "test_vim"], "--what all uses each family's default model"),
    (["--what", "vim_erf", "--model", "test_vim", "--image", "no_such_photo"], "not a bundled photo"),
    (["--what", "vim_erf", "--model", "test_vim", "--point", "2", "0.5"], "as fractions of the image"),
    (["--what", "vim_erf", "--model", "test_vim", "--checkpoint", "missing.pth"], "no such file"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        visualize.main([*argv, "--out", str(tmp_path / "x.png")])
    msg = exc.value.code
    assert isinstance(msg, str) and msg.startswith("visualize: ") and "\n" not in msg and expected in msg, msg
    assert not (tmp_path / "x.png").exists()


def test_cli_bad_checkpoint_is_one_line(official, tmp_path):
    path, _ = official["test_biformer"]  # a BiFormer file for a Vim picture
    with pytest.raises(SystemExit) as exc:
        visualize.main(["--what", "vim_erf", "--model", "test_vim", "--checkpoint", str(path),
                        "--out", str(tmp_path / "x.png")])
    assert str(exc.value.code).startswith("visualize: cannot build test_vim from") and "\n" not in exc.value.code
