"""FID (domain features and offline Inception), precision/recall and the domain classifier."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import metrics.fid as fid_mod
from data.fashion_mnist import FashionMNIST
from metrics.domain_classifier import DomainClassifier, DomainFeatures, accuracy, train_domain_classifier
from metrics.fid import (
    INCEPTION_FILE,
    INCEPTION_NAME,
    FIDResult,
    MissingWeightsError,
    OfflineInceptionScore,
    domain_fid,
    inception_fid,
    make_fid,
    to_uint8_rgb,
)
from metrics.precision_recall import PrecisionRecall, knn_radii, precision_recall


@pytest.fixture
def empty_hub(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(old)


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionMNIST(split=split)
    x = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(ds.labels)


@pytest.fixture(scope="session")
def fashion_classifier(tmp_path_factory):
    """One epoch on all 60k Fashion-MNIST images (~30 s on two idle cores), saved to a checkpoint."""
    train_x, train_y = _split("train")
    test_x, test_y = _split("test")
    start = time.perf_counter()
    model, acc = train_domain_classifier(
        train_x, train_y, test_x, test_y, width=16, epochs=1, batch_size=256, lr=2e-3, seed=0,
        dataset="fashion_mnist",
    )
    seconds = time.perf_counter() - start
    path = model.save(tmp_path_factory.mktemp("domain") / "fashion_mnist.pt", test_accuracy=acc)
    return {"model": model, "acc": acc, "path": path, "seconds": seconds, "test": (test_x, test_y)}


def _random_classifier(seed: int = 0) -> DomainClassifier:
    torch.manual_seed(seed)
    return DomainClassifier(in_channels=1, num_classes=10, image_size=28, width=8).eval()


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)


# ---- domain classifier ----------------------------------------------------------------------


def test_domain_classifier_accuracy_and_checkpoint(fashion_classifier):
    print(f"domain classifier: test accuracy {fashion_classifier['acc']:.4f} in {fashion_classifier['seconds']:.1f} s")
    assert fashion_classifier["acc"] > 0.85
    loaded = DomainClassifier.load(fashion_classifier["path"])
    assert loaded.dataset == "fashion_mnist" and loaded.test_accuracy == pytest.approx(fashion_classifier["acc"])
    test_x, test_y = fashion_classifier["test"]
    x = test_x[:64].float() / 127.5 - 1
    assert torch.equal(loaded.features(x), fashion_classifier["model"].features(x))
    assert accuracy(loaded, x, test_y[:64]) == accuracy(fashion_classifier["model"], x, test_y[:64])
    # No temporary file is left beside the checkpoint.
    assert [p.name for p in fashion_classifier["path"].parent.iterdir()] == ["fashion_mnist.pt"]


def test_domain_fid_from_checkpoint_is_labelled_and_separates_classes(fashion_classifier):
    test_x, test_y = fashion_classifier["test"]
    x = test_x.float() / 127.5 - 1
    metric = make_fid("domain", checkpoint=fashion_classifier["path"])
    # Real: 500 images of every class; fake A: 500 other images of every class; fake B: only trousers.
    metric.update(x[:500], real=True)
    metric.update(x[500:1000], real=False)
    same_dist = metric.result()
    metric.reset()
    metric.update(x[:500], real=True)
    metric.update(x[test_y == 1][:500], real=False)
    one_class = metric.result()
    assert same_dist.feature_extractor == f"domain classifier fashion_mnist ({fashion_classifier['path']})"
    assert "inception" not in same_dist.feature_extractor
    assert (same_dist.num_real, same_dist.num_fake, same_dist.resolution) == (500, 500, (28, 28))
    assert one_class.value > 5 * same_dist.value


def test_domain_fid_zero_for_same_set_and_monotone_in_noise():
    metric = domain_fid(_random_classifier(), name="domain classifier random (untrained)")
    real = _smooth_images(256, seed=0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(real.shape, generator=g)
    values = []
    for sigma in (0.0, 0.1, 0.3, 1.0):
        metric.reset()
        metric.update(real, real=True)
        metric.update(real + sigma * noise, real=False)
        values.append(metric.result().value)
    assert values[0] < 1e-6 * values[-1]
    assert values[0] < values[1] < values[2] < values[3]
    result = metric.result()
    assert isinstance(result, FIDResult)
    assert result.as_dict() == {
        "value": result.value,
        "feature_extractor": "domain classifier random (untrained)",
        "num_real": 256,
        "num_fake": 256,
        "resolution": (28, 28),
    }
    with pytest.raises(ValueError, match="one resolution"):
        metric.update(torch.zeros(2, 1, 32, 32), real=False)


class _IdentityFeatures(torch.nn.Module):
    """Feature "extractor" that hands back its input, so FID runs on given feature vectors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula in float64: ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), unbiased S."""
    import scipy.linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _feature_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    f32 = np.float32
    gauss = rng.standard_normal((200, 16)).astype(f32)
    mix = rng.standard_normal((16, 16))
    relu = np.maximum(rng.standard_normal((300, 64)), 0).astype(f32)  # pooled-ReLU-like features
    return {
        "shifted and scaled": (gauss, (rng.standard_normal((150, 16)) * 1.2 + 0.3).astype(f32)),
        "nearly identical (small FID)": (gauss, gauss + 0.01 * rng.standard_normal(gauss.shape).astype(f32)),
        "fewer samples than dims (singular covariances)": (
            rng.standard_normal((10, 16)).astype(f32), rng.standard_normal((12, 16)).astype(f32)),
        "correlated features": ((rng.standard_normal((100, 16)) @ mix).astype(f32),
                                (0.9 * rng.standard_normal((100, 16)) @ mix).astype(f32)),
        "large common offset (cancellation)": (gauss + 1e3, (rng.standard_normal((150, 16)) * 1.1 + 1e3).astype(f32)),
        "non-negative 64-d": (relu, np.maximum(rng.standard_normal((300, 64)) + 0.1, 0).astype(f32)),
    }


@pytest.mark.parametrize("case", list(_feature_sets()))
@pytest.mark.parametrize("batches", [1, 3])
def test_fid_equals_float64_scipy_reference(case, batches):
    """Our FID on fixed feature sets equals the float64 NumPy/SciPy (sqrtm) value to 1e-4 relative,
    whether the features arrive in one update or several."""
    a, b = _feature_sets()[case]
    metric = fid_mod.FID(_IdentityFeatures(a.shape[1]), "identity features", uint8_inputs=False)
    for chunk in np.array_split(a, batches):
        metric.update(torch.from_numpy(chunk)[:, :, None, None], real=True)
    for chunk in np.array_split(b, batches):
        metric.update(torch.from_numpy(chunk)[:, :, None, None], real=False)
    result = metric.result()
    want = _scipy_fid(a, b)
    assert result.value == pytest.approx(want, rel=1e-4), (case, result.value, want)
    assert (result.num_real, result.num_fake) == (len(a), len(b))


# ---- Inception (offline) --------------------------------------------------------------------


def test_inception_without_weights_is_a_clear_error_never_a_fallback(empty_hub):
    for build in (inception_fid, lambda: make_fid("inception"), OfflineInceptionScore):
        with pytest.raises(MissingWeightsError) as info:
            build()
        assert isinstance(info.value, FileNotFoundError)
        assert INCEPTION_FILE in str(info.value) and str(empty_hub) in str(info.value)
    with pytest.raises(MissingWeightsError, match="configured path"):
        inception_fid(weights_path=empty_hub / "nope.pth")
    with pytest.raises(ValueError, match="checkpoint"):
        make_fid("domain")


def test_inception_loads_local_file_without_network(empty_hub, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # Make an Inception weight file of the right architecture (random values) in the hub cache.
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    state = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    empty_hub.mkdir(parents=True)
    torch.save(state, empty_hub / INCEPTION_FILE)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    metric = inception_fid()
    assert metric.feature_extractor == INCEPTION_NAME
    loaded = metric.inception.state_dict()
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
    images = _smooth_images(2, seed=3)
    metric.update(images, real=True)
    metric.update(images, real=False)
    result = metric.result()
    assert (result.feature_extractor, result.num_real, result.resolution) == (INCEPTION_NAME, 2, (28, 28))
    # A file that holds more than tensors is refused rather than unpickled.
    torch.save({"fc.weight": torch.zeros(1), "obj": fid_mod.FIDResult(0.0, "x", 0, 0, None)}, empty_hub / "bad.pth")
    with pytest.raises(ValueError, match="plain tensor state dict"):
        inception_fid(weights_path=empty_hub / "bad.pth")


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, 2].flatten().tolist() == [0, 128, 255, 255]


# ---- precision / recall ---------------------------------------------------------------------


def test_precision_recall_identical_disjoint_and_collapsed():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=g)
    same = precision_recall(real, real.clone())
    assert same["precision"].item() == 1.0 and same["recall"].item() == 1.0
    far = precision_recall(real, torch.randn(400, 16, generator=g) + 50.0)
    assert far["precision"].item() == 0.0 and far["recall"].item() == 0.0
    # Samples squeezed into the middle of the real distribution: faithful but not diverse.
    collapsed = precision_recall(real, 0.2 * torch.randn(400, 16, generator=g))
    assert collapsed["precision"].item() > 0.9 and collapsed["recall"].item() < 0.1


def test_precision_recall_chunking_and_knn():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # 3rd nearest other point: 0 -> 6, 1 -> 5, 3 -> 3 (0,1,6 at 3,2,3), 6 -> 5, 10 -> 9.
    assert knn_radii(points, k=3).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(250, 8, generator=g) * 1.3
    assert precision_recall(real, fake, chunk_size=7) == precision_recall(real, fake, chunk_size=4096)


def test_precision_recall_metric_over_domain_features():
    features = DomainFeatures(_random_classifier())
    metric = PrecisionRecall(features)
    real = _smooth_images(64, seed=0)
    metric.update(real[:32], real=True)
    metric.update(real[32:], real=True)
    metric.update(real, real=False)
    out = metric.compute()
    assert out["precision"].item() == 1.0 and out["recall"].item() == 1.0
