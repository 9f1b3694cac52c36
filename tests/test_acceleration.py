"""The GPU-ready training path (issue 22), run on CPU: bf16 autocast for every config, compile, fused
Adam, channels-last, TF32 from the config; quantizers keep distances and statistics in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from test_quantizer_zoo_scalar import FACTORIES as SCALAR_QUANTIZERS
from test_quantizer_zoo_vq import FACTORIES as VQ_QUANTIZERS
from test_smoke_configs import SMOKES, _needed_overrides

from helpers import CONFIGS, logged_series, train
from layers.instantiate import ConfigError
from layers.transformer import Block
from stage1.quantizers.vq import VectorQuantizer
from tokenforge.acceleration import fuse_adam

QUANTIZERS = {**SCALAR_QUANTIZERS, **VQ_QUANTIZERS,
              "vq_ema": lambda: VectorQuantizer(8, 16, codebook="ema", codebook_dim=4),
              "vq_cosine_kmeans": lambda: VectorQuantizer(8, 16, distance="cosine", kmeans_init=True)}


def test_fused_adam_steps_like_the_reference_and_leaves_other_optimizers_alone():
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1) for ps in (ref, fused)]
    assert fuse_adam(opts[1]) and opts[1].param_groups[0]["fused"]
    for step in range(3):
        for ps, opt in zip((ref, fused), opts):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    for a, b in zip(ref, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not fuse_adam(torch.optim.SGD(ref, lr=0.1))
    assert not fuse_adam(opts[0])  # already stepped: its state is the unfused kind


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizer_distances_and_statistics_stay_fp32_under_bf16_autocast(name):
    torch.manual_seed(0)
    q = QUANTIZERS[name]().train()
    z = torch.randn(2, 8, 4, 5)
    q(z)  # first call: any data-dependent initialisation (k-means) happens in fp32
    q.eval()
    reference = q(z).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = q(z)
    assert torch.equal(under.codes, reference), "autocast changed the nearest codes"
    q.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(z)
    low = [n for n, b in q.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]
    assert not low, f"statistics left fp32 under autocast: {low}"


@pytest.mark.parametrize("name", SMOKES)
def test_every_config_trains_under_bf16_mixed_precision(name, run_root, request):
    train(CONFIGS / "smoke" / f"{name}.yaml", run_root, [*_needed_overrides(name, request),
          "trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.limit_val_batches=0",
          "trainer.log_every_n_steps=1"], name=f"{name}_bf16")
    _, values = logged_series(run_root / f"{name}_bf16")
    assert values and all(math.isfinite(v) for v in values), values


def test_compiled_blocks_and_channels_last_train_and_store_plain_checkpoints(tokenizer_and_codes, tmp_path):
    _, codes = tokenizer_and_codes
    trainer = train(CONFIGS / "smoke" / "ar.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=2",
                    "trainer.limit_val_batches=1", "model.params.compile=aot_eager"], name="ar_compiled")
    model = trainer.lightning_module
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert trainer.optimizers[0].param_groups[0]["fused"] is True
    state = torch.load(tmp_path / "ar_compiled" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "compile" not in state["hyper_parameters"] and not any("_orig_mod" in k for k in state["state_dict"])

    trainer = train(CONFIGS / "smoke" / "vqvae.yaml", tmp_path, ["trainer.max_steps=2", "trainer.limit_val_batches=1",
                    "model.params.channels_last=true", "model.params.compile=aot_eager"], name="vq_fast")
    tok = trainer.lightning_module
    conv = next(m for m in tok.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert tok.encoder._compiled_call_impl is not None and tok.decoder._compiled_call_impl is not None


def test_bad_runtime_options_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not a torch.compile backend"):
        train(CONFIGS / "smoke" / "vqvae.yaml", tmp_path, ["model.params.compile=turbo"])
    with pytest.raises(ConfigError, match="allow_tf32 must be true or false"):
        train(CONFIGS / "smoke" / "vqvae.yaml", tmp_path, ["allow_tf32=maybe"])


def test_tf32_follows_the_config(tmp_path):
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        train(CONFIGS / "smoke" / "vqvae.yaml", tmp_path, ["trainer.max_steps=1", "trainer.limit_val_batches=1"],
              name="tf32_default")
        assert torch.backends.cuda.matmul.allow_tf32 is True
        train(CONFIGS / "smoke" / "vqvae.yaml", tmp_path, ["trainer.max_steps=1", "trainer.limit_val_batches=1",
              "allow_tf32=false"], name="tf32_off")
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
