"""The Hydra tree: a model config per registered variant, and every group composes."""
import subprocess
import sys
from pathlib import Path

import pytest

import visionzoo

ROOT = Path(__file__).resolve().parents[2]


def test_every_registered_model_has_a_config():
    missing = [n for n in visionzoo.list_models() if not (ROOT / "configs" / "model" / f"{n}.yaml").is_file()]
    assert not missing, f"configs/model lacks {missing}: run python tools/gen_model_configs.py"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_model_configs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_groups_compose():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from visionzoo.tasks.train import register_resolvers

    register_resolvers()
    groups = {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml"))
              for g in ("task", "data", "optim", "sched", "trainer", "logger", "experiment")}
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.run_dir=/tmp/x"])
        assert cfg.model.model_name and cfg.task.name == "classification" and cfg.data.format == "demo"
        for group, options in groups.items():
            for opt in options:
                over = [f"{group}={opt}", "paths.run_dir=/tmp/x"]
                c = compose("train", overrides=over)
                # resolve everything but the mandatory data roots
                for key in ("task", "optim", "sched", "trainer", "logger", "model"):
                    _ = {k: c[key][k] for k in c[key]}
        for exp in groups["experiment"]:
            c = compose("train", overrides=[f"experiment={exp}", "paths.run_dir=/tmp/x"])
            assert (ROOT / "configs" / "model" / f"{c.model.model_name}.yaml").is_file(), exp
