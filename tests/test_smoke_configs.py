"""Every config in configs/ trains a few steps from its configs/smoke/ twin with a finite, falling loss."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers import CONFIGS, assert_finite_and_falling, logged_series, train

SMOKES = sorted(p.stem for p in (CONFIGS / "smoke").glob("*.yaml"))


def test_every_config_has_a_smoke_twin():
    missing = [p.name for p in CONFIGS.glob("*.yaml") if not (CONFIGS / "smoke" / p.name).is_file()]
    assert not missing, f"configs without a configs/smoke/ twin: {missing}"


def _needed_overrides(name: str, request) -> list[str]:
    """Fill the config's required inputs (`???`): an image folder, a code folder or a tokenizer checkpoint."""
    raw = OmegaConf.load(CONFIGS / "smoke" / f"{name}.yaml")
    params = raw.data.get("params", {})
    overrides = []
    if "codes" in params.keys() and OmegaConf.is_missing(params, "codes"):
        # continuous priors (GIVT) model a KL-VAE's latents, the others a VQ-VAE's codes
        fixture = "klvae_and_latents" if "givt" in str(raw.model.target) else "tokenizer_and_codes"
        if raw.model.get("params", {}).get("level"):  # a prior of one level of hierarchical (VQ-VAE-2) codes
            fixture = "vqvae2_and_codes"
        _, codes = request.getfixturevalue(fixture)
        overrides.append(f"data.params.codes={codes}")
    if "root" in params.keys() and OmegaConf.is_missing(params, "root"):
        overrides.append(f"data.params.root={request.getfixturevalue('shapes_folder')}")
    model_params = raw.model.get("params", {})
    if "tokenizer" in model_params.keys() and OmegaConf.is_missing(model_params, "tokenizer"):
        # policies over a frozen behaviour tokenizer (VQ-BeT, the observation-conditioned AR prior)
        overrides.append(f"model.params.tokenizer={request.getfixturevalue('action_tokenizer')}")
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
    if "CodebookHistogram" in text:  # continuous tokenizers (KL-VAE) have no codebook to histogram
        assert list((run / "images").glob("usage_step*.png")), "no usage histogram was written"


QUANTIZER_SWAPS = {
    "fsq": "{target: stage1.quantizers.fsq.FSQ, params: {levels: [8, 5, 5]}}",
    "lfq": "{target: stage1.quantizers.lfq.LFQ, params: {bits: 8}}",
    "residual": "{target: stage1.quantizers.residual.ResidualQuantizer, params: {depth: 2, quantizer: "
                "{target: stage1.quantizers.vq.VectorQuantizer, params: {codebook_size: 32}}}}",
}


@pytest.mark.parametrize("name", sorted(QUANTIZER_SWAPS))
def test_a_config_override_swaps_the_quantizer_without_code_changes(name, run_root):
    from stage1 import load_tokenizer

    train(CONFIGS / "smoke" / "vqvae.yaml", run_root,
          [f"model.params.quantizer={QUANTIZER_SWAPS[name]}", "trainer.max_steps=6", "trainer.val_check_interval=6"],
          name=name)
    tok = load_tokenizer(run_root / name / "checkpoints" / "last.ckpt")
    expected = {"fsq": (200, None), "lfq": (256, None), "residual": (32, 2)}[name]
    assert (tok.code_spec["codebook_size"], tok.code_spec["depth"]) == expected
    codes = tok.encode(torch.zeros(2, 1, 28, 28))
    assert codes.shape == ((2, 7, 7) if expected[1] is None else (2, 7, 7, 2))
