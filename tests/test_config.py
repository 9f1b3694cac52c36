"""Config loading, overrides and the documented errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from layers.instantiate import ConfigError, instantiate
from tokenforge.config import load_config, to_plain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_apply_and_interpolations_resolve():
    cfg = to_plain(load_config(CONFIGS / "vqvae.yaml", ["trainer.max_steps=7", "data.params.size=32",
                                                        "model.params.quantizer.params.codebook_size=64"]))
    assert cfg["trainer"]["max_steps"] == 7
    assert cfg["model"]["params"]["resolution"] == 32  # follows ${data.params.size}
    assert cfg["model"]["params"]["quantizer"]["params"]["codebook_size"] == 64


def test_unknown_parameter_names_the_key_and_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "vqvae.yaml", ["model.params.quantizer.params.codebook_sise=64"])
    msg = str(err.value)
    assert "codebook_sise" in msg and "codebook_size" in msg and "Valid parameters" in msg


def test_unknown_section_key_is_refused_with_close_match():
    with pytest.raises(ConfigError, match="Did you mean trainer"):
        load_config(CONFIGS / "vqvae.yaml", ["trainr.max_steps=3"])


def test_unknown_trainer_argument_is_refused():
    with pytest.raises(ConfigError, match="max_step"):
        load_config(CONFIGS / "vqvae.yaml", ["trainer.max_step=3"])


def test_disallowed_target_is_refused_with_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {target: os.system, params: {command: 'echo hi'}}\n"
                   "data: {target: data.images.ImageDataModule}\n")
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not allowed"):
        instantiate({"target": "subprocess.run", "params": {"args": ["true"]}})


def test_misspelt_spec_key_and_missing_target_attribute():
    with pytest.raises(ConfigError, match="unknown key"):
        instantiate({"target": "torch.nn.Linear", "parms": {}})
    with pytest.raises(ConfigError, match="has no attribute"):
        instantiate({"target": "torch.nn.Lineer", "params": {}})


def test_missing_config_file_and_missing_value(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  target: torch.nn.Linear\n  params:\n    in_features: ???\n    out_features: 2\n"
                   "data: {target: torch.nn.Identity}\n")
    with pytest.raises(ConfigError, match="in_features"):
        load_config(cfg)


def test_allowed_target_builds():
    layer = instantiate({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert layer.weight.shape == (2, 3)


@pytest.mark.parametrize("key", ["default_root_dir=/tmp/x", "callbacks=[]", "logger=false", "model_registry=m"])
def test_trainer_keys_the_command_owns_are_refused(key):
    with pytest.raises(ConfigError, match=f"trainer.{key.split('=')[0]} cannot be set"):
        load_config(CONFIGS / "vqvae.yaml", [f"trainer.{key}"])


@pytest.mark.parametrize("bad", ["max_steps=abc", "max_steps=1.5", "devices=[a]", "precision=17",
                                 "limit_val_batches=x"])
def test_trainer_values_are_type_checked(bad):
    if bad == "devices=[a]":  # a list of names is a list: Lightning parses the entries itself
        load_config(CONFIGS / "vqvae.yaml", [f"trainer.{bad}"])
        return
    with pytest.raises(ConfigError, match=f"trainer.{bad.split('=')[0]}=.*wrong type"):
        load_config(CONFIGS / "vqvae.yaml", [f"trainer.{bad}"])


def test_ordinary_trainer_values_pass():
    cfg = to_plain(load_config(CONFIGS / "vqvae.yaml", [
        "trainer.max_steps=5", "trainer.devices=[0,1]", "trainer.precision=bf16-mixed",
        "trainer.val_check_interval=0.5", "trainer.max_epochs=null", "trainer.strategy=ddp",
        "trainer.limit_val_batches=2", "trainer.max_time=00:01:00:00"]))
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["devices"] == [0, 1]
