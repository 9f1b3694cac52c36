"""Every config in configs/ trains a few steps from its configs/smoke/ twin with a finite, falling loss."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from helpers import CONFIGS, assert_finite_and_falling, logged_series, train

SMOKES = sorted(p.stem for p in (CONFIGS / "smoke").glob("*.yaml"))


def test_every_config_has_a_smoke_twin():
    missing = [p.name for p in CONFIGS.glob("*.yaml") if not (CONFIGS / "smoke" / p.name).is_file()]
    assert not missing, f"configs without a configs/smoke/ twin: {missing}"


def _needed_overrides(name: str, request) -> list[str]:
    """Fill the config's required inputs (`???`): an image folder or a code folder."""
    raw = OmegaConf.load(CONFIGS / "smoke" / f"{name}.yaml")
    params = raw.data.get("params", {})
    overrides = []
    if "codes" in params.keys() and OmegaConf.is_missing(params, "codes"):
        _, codes = request.getfixturevalue("tokenizer_and_codes")
        overrides.append(f"data.params.codes={codes}")
    if "root" in params.keys() and OmegaConf.is_missing(params, "root"):
        overrides.append(f"data.params.root={request.getfixturevalue('shapes_folder')}")
    return overrides


@pytest.mark.parametrize("name", SMOKES)
def test_smoke_config_trains_with_falling_loss(name, run_root, request):
    train(CONFIGS / "smoke" / f"{name}.yaml", run_root, _needed_overrides(name, request))
    run = run_root / name
    key, values = logged_series(run)
    assert_finite_and_falling(values, f"{name} {key}")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    assert list((run / "logs" / "tb").glob("events.out.tfevents*")), "no TensorBoard log"
    text = (CONFIGS / "smoke" / f"{name}.yaml").read_text()
    if "layers.moe" in text:  # MoE layers must report their per-expert load and balance
        header = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
        assert "load" in header and "balance_loss" in header, header
    if "ReconstructionGrid" in text:
        assert list((run / "images").glob("recon_step*.png")), "no reconstruction grid was written"
        assert list((run / "images").glob("usage_step*.png")), "no usage histogram was written"
