"""RQ-VAE: one shared codebook, decoding with the first d levels, per-depth evaluation, and the whole
chain tiny RQ-VAE -> tokenize -> RQ-Transformer -> sample -> decoded images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import CONFIGS, train, train_and_tokenize
from layers.instantiate import instantiate
from stage1.depth_eval import DepthReconstruction, decode_first_levels, residual_depth
from tokenforge.config import load_config, to_plain


def _smoke_tokenizer(name: str = "rqvae"):
    cfg = to_plain(load_config(CONFIGS / "smoke" / f"{name}.yaml"))
    torch.manual_seed(0)
    return instantiate(cfg["model"], where="model")


def test_rqvae_config_has_one_shared_codebook_tensor():
    tok = _smoke_tokenizer()
    q = tok.quantizer
    assert tok.code_spec["depth"] == 3 and tok.code_spec["grid"] == [8, 8] and tok.code_spec["codebook_size"] == 32
    assert all(q.level(i) is q.level(0) for i in range(3))
    books = [k for k in tok.state_dict() if k.startswith("quantizer.") and k.endswith(".embed")]
    assert books == ["quantizer.quantizers.0.embed"]  # one tensor, not one per level
    assert residual_depth(tok) == 3


def test_decoding_with_the_first_d_levels_is_the_partial_sum():
    tok = _smoke_tokenizer().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tok.quantizer.train()
    tok.quantizer(tok.quant_conv(tok.encoder(x)))  # k-means initialisation of the codebook
    tok.eval()
    codes = tok.encode(x)
    assert codes.shape == (2, 8, 8, 3)
    book = tok.quantizer.level(0).embed  # (K, C): the shared codebook
    for d in (1, 2, 3):
        partial = book[codes[..., :d]].sum(dim=-2).permute(0, 3, 1, 2)  # sum_{l<d} e(c_l), channel-first
        torch.testing.assert_close(tok.quantizer.decode(codes, levels=d), partial, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            expected = tok.decoder(tok.post_quant_conv(partial))
        torch.testing.assert_close(decode_first_levels(tok, codes, d), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(decode_first_levels(tok, codes, 1), decode_first_levels(tok, codes, 3))
    with pytest.raises(ValueError, match="levels"):
        decode_first_levels(tok, codes, 4)


class _ScaledLevels:
    """A stand-in tokenizer: level l adds 2**-l, so d levels reconstruct 1 - 2**-d."""

    code_spec = {"depth": 3}

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        used = (codes >= 0).float()
        value = (used * 2.0 ** -torch.arange(1, 4).float()).sum(-1) * 2 - 1  # on [-1, 1]
        return value[:, None].expand(-1, 2, -1, -1)


def test_depth_reconstruction_follows_the_psnr_formula():
    metric = DepthReconstruction(3)
    x = torch.ones(4, 2, 5, 5)  # the target 1 on [-1, 1], i.e. 1 on [0, 1]
    metric.update(_ScaledLevels(), x, torch.zeros(4, 5, 5, 3, dtype=torch.long))
    out = metric.compute()
    for d in (1, 2, 3):
        err_unit = (2.0 ** -d) ** 2  # (1 - (1 - 2**-d))**2 on the [0, 1] scale
        assert out[f"mse_levels{d}"] == pytest.approx(err_unit)
        assert out[f"psnr_levels{d}"] == pytest.approx(-10 * np.log10(err_unit))


@pytest.fixture(scope="module")
def rq_tokenizer_and_codes(tmp_path_factory):
    return train_and_tokenize(tmp_path_factory.mktemp("rq"), "rqvae_fmnist", ["trainer.max_steps=8"])


def test_tiny_rqvae_codes_train_an_rq_transformer_whose_samples_decode(rq_tokenizer_and_codes, tmp_path):
    from PIL import Image

    from stage1.tokenizer import load_tokenizer
    from tokenforge.sample import main as sample

    ckpt, codes = rq_tokenizer_and_codes
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["code_spec"]["depth"] == 3 and manifest["code_spec"]["grid"] == [7, 7]
    train(CONFIGS / "smoke" / "rq_transformer.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=6",
                                                                "trainer.val_check_interval=6"])
    out = sample([str(tmp_path / "rq_transformer" / "checkpoints" / "last.ckpt"), "-n", "4", "--class", "3", "7",
                  "--cfg", "1.5", "--top-k", "8", "--out", str(tmp_path / "samples")])
    record = json.loads((out / "samples.json").read_text())
    assert record["code_shape"] == [4, 7, 7, 3] and record["sampling"]["cfg_scale"] == 1.5
    assert Image.open(out / "00003.png").size == (28, 28)
    drawn = np.load(out / "codes.npy")
    assert drawn.min() >= 0 and drawn.max() < load_tokenizer(ckpt).code_spec["codebook_size"]


def test_evaluate_reports_usage_and_reconstruction_per_depth(rq_tokenizer_and_codes, tmp_path):
    from tokenforge.evaluate import main as evaluate

    ckpt, _ = rq_tokenizer_and_codes
    results = evaluate([str(ckpt), "--limit", "16", "--fid", "none", "--lpips", "none", "--out", str(tmp_path)])
    for d in range(3):
        assert 0 < results[f"usage_level{d}"] <= 1 and results[f"perplexity_level{d}"] >= 1
    assert 0 < results["usage"] <= 1  # the shared codebook, all levels pooled
    psnr = [results[f"psnr_levels{d}"] for d in (1, 2, 3)]
    assert all(np.isfinite(psnr))
    # all D levels: the tokenizer's own reconstruction, as the modality's metrics measured it
    assert results["mse_levels3"] == pytest.approx(results["mse"], rel=1e-4)
    assert results["psnr_levels3"] == pytest.approx(results["psnr"], rel=1e-4)


def test_soft_labels_read_the_codebook_of_the_tokenizer_named_by_the_codes(rq_tokenizer_and_codes, tmp_path):
    from stage1.tokenizer import load_tokenizer
    from stage2.rq_transformer import tokenizer_codebook

    ckpt, codes = rq_tokenizer_and_codes
    book = load_tokenizer(ckpt).quantizer.level(0).embed
    tables = tokenizer_codebook(str(ckpt), 3, 32)
    assert tables.shape == (3, 32, book.shape[1])
    for d in range(3):
        torch.testing.assert_close(tables[d], book)
    trainer = train(CONFIGS / "smoke" / "rq_transformer.yaml", tmp_path,
                    [f"data.params.codes={codes}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                     "model.params.soft_label_temperature=0.5", "model.params.stochastic_codes=true"])
    model = trainer.lightning_module
    torch.testing.assert_close(model.codebook_tables, tables)  # read at fit time from the manifest's tokenizer
    assert trainer.global_step == 4
