"""Codebook usage, reconstruction metrics and the offline LPIPS loader."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.codebook import CodebookUsage
from metrics.lpips_offline import TRUNK_FILES, load_lpips, prepare_lpips_inputs
from metrics.reconstruction import ReconstructionMetrics
from metrics.weights import MissingWeightsError


@pytest.fixture
def empty_hub(tmp_path):
    """Point torch.hub at an empty folder so no cached weights can be found; restore afterwards."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def random_lpips():
    """LPIPS-AlexNet with a random trunk and the shipped heads, built once (VGG would cost ~5 s more)."""
    module, reason = load_lpips("alex", pretrained=False)
    assert module is not None and reason is None
    return module


# ---- CodebookUsage -------------------------------------------------------------------------


def test_codebook_counts_and_stats_exact():
    m = CodebookUsage(codebook_size=8)
    # Two batches of (B, H, W) codes: code 0 six times, code 1 and code 2 once each... see counts.
    m.update(torch.tensor([[[0, 0], [1, 2]]]))
    m.update(torch.tensor([[[0, 0], [0, 0]], [[3, 3], [3, 3]]]))
    counts = m.counts()
    assert counts.tolist() == [6, 1, 1, 4, 0, 0, 0, 0]
    out = m.compute()
    p = torch.tensor([6, 1, 1, 4], dtype=torch.float64) / 12
    entropy = float(-(p * p.log()).sum())
    assert out["usage"].item() == pytest.approx(4 / 8)
    assert out["dead_codes"].item() == 4
    assert out["perplexity"].item() == pytest.approx(math.exp(entropy), rel=1e-6)
    assert out["entropy_bits"].item() == pytest.approx(entropy / math.log(2), rel=1e-6)


def test_codebook_uniform_and_collapsed():
    uniform = CodebookUsage(4)
    uniform.update(torch.arange(4).repeat(5))
    out = uniform.compute()
    assert out["perplexity"].item() == pytest.approx(4.0)
    assert out["entropy_bits"].item() == pytest.approx(2.0)
    assert out["usage"].item() == 1.0 and out["dead_codes"].item() == 0
    collapsed = CodebookUsage(4)
    collapsed.update(torch.full((3, 5), 2))
    out = collapsed.compute()
    assert out["perplexity"].item() == pytest.approx(1.0)
    assert out["entropy_bits"].item() == 0.0
    assert out["dead_codes"].item() == 3


def test_codebook_per_level_for_residual_codes():
    m = CodebookUsage(codebook_size=4, depth=2)
    # (B=1, grid=3, depth=2): level 0 always code 0, level 1 uses codes 1, 2, 3.
    m.update(torch.tensor([[[0, 1], [0, 2], [0, 3]]]))
    counts = m.counts()
    assert counts.shape == (2, 4)
    assert counts.tolist() == [[3, 0, 0, 0], [0, 1, 1, 1]]
    out = m.compute()
    assert out["usage_level0"].item() == pytest.approx(0.25)
    assert out["dead_codes_level0"].item() == 3
    assert out["perplexity_level0"].item() == pytest.approx(1.0)
    assert out["usage_level1"].item() == pytest.approx(0.75)
    assert out["perplexity_level1"].item() == pytest.approx(3.0)
    # Overall values pool the levels (shared-codebook view): all four codes used.
    assert out["usage"].item() == 1.0 and out["dead_codes"].item() == 0
    with pytest.raises(ValueError, match="depth axis"):
        m.update(torch.zeros(2, 3, 3, dtype=torch.long))


def test_codebook_reset_and_validation():
    m = CodebookUsage(4)
    m.update(torch.tensor([1, 1, 2]))
    m.reset()
    assert m.counts().sum().item() == 0
    m.update(torch.tensor([3]))
    assert m.counts().tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.update(torch.tensor([4]))
    with pytest.raises(TypeError):
        m.update(torch.tensor([0.5]))


# ---- ReconstructionMetrics ------------------------------------------------------------------


def _images(seed: int = 0, n: int = 4, c: int = 1, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish images (upsampled noise) so SSIM has structure to compare.
    low = torch.rand(n, c, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_reconstruction_identical_and_noisy():
    x = _images()
    metrics = ReconstructionMetrics()
    same = metrics(x, x)
    assert same["mse"].item() == 0.0
    assert math.isinf(same["psnr"].item()) or same["psnr"].item() > 80
    assert same["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(1)
    psnrs, ssims = [], []
    for sigma in (0.02, 0.1, 0.4):
        metrics.reset()
        metrics.update((x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
        out = metrics.compute()
        psnrs.append(out["psnr"].item())
        ssims.append(out["ssim"].item())
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert ssims[0] > ssims[1] > ssims[2]
    # sigma 0.02 in [-1, 1] is 0.01 on the [0, 1] scale: PSNR = -10 log10(1e-4) = 40 dB (clamping aside).
    assert psnrs[0] == pytest.approx(40.0, abs=0.5)


def test_reconstruction_with_random_lpips(random_lpips):
    metrics = ReconstructionMetrics(random_lpips, prefix="val/")
    x = _images(c=3)
    assert metrics(x, x)["val/lpips"].item() == pytest.approx(0.0, abs=1e-7)
    metrics.reset()
    metrics.update(_images(seed=5, c=3), x)
    assert metrics.compute()["val/lpips"].item() > 0


# ---- LPIPS offline --------------------------------------------------------------------------


def test_lpips_random_trunk_zero_for_identical_positive_otherwise(random_lpips):
    module = random_lpips
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert module(x, x).abs().max().item() < 1e-7
        assert (module(x, y) > 0).all()
    assert not any(p.requires_grad for p in module.parameters())


def test_lpips_small_grey_inputs_are_prepared():
    x = torch.zeros(2, 1, 28, 28)
    assert prepare_lpips_inputs(x, "alex").shape == (2, 3, 64, 64)
    assert prepare_lpips_inputs(x, "vgg").shape == (2, 3, 28, 28)


def test_lpips_missing_weights_reason_or_error(empty_hub):
    module, reason = load_lpips("vgg")
    assert module is None
    assert TRUNK_FILES["vgg"] in reason and str(empty_hub) in reason
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as info:
        load_lpips("alex", required=True)
    assert isinstance(info.value, FileNotFoundError)
    assert str(empty_hub) in str(info.value)


def test_lpips_trunk_loads_from_local_file(tmp_path, empty_hub):
    # A torchvision-format AlexNet checkpoint (features only, random values) in a configured folder.
    torch.manual_seed(0)
    features = {
        "features.0.weight": torch.randn(64, 3, 11, 11), "features.0.bias": torch.randn(64),
        "features.3.weight": torch.randn(192, 64, 5, 5), "features.3.bias": torch.randn(192),
        "features.6.weight": torch.randn(384, 192, 3, 3), "features.6.bias": torch.randn(384),
        "features.8.weight": torch.randn(256, 384, 3, 3), "features.8.bias": torch.randn(256),
        "features.10.weight": torch.randn(256, 256, 3, 3), "features.10.bias": torch.randn(256),
    }
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(features, folder / TRUNK_FILES["alex"])
    module, reason = load_lpips("alex", required=True, weights_dir=folder)
    assert reason is None
    assert torch.equal(module.net.slice1[0].weight, features["features.0.weight"])
    assert torch.equal(getattr(module.net.slice5, "10").bias, features["features.10.bias"])
    # A file that is not a torchvision AlexNet is refused, not half-loaded.
    torch.save({"something": torch.zeros(1)}, folder / TRUNK_FILES["alex"])
    with pytest.raises(ValueError, match="not a torchvision"):
        load_lpips("alex", weights_dir=folder)
