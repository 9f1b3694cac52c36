"""Tokenizer -> code files -> prior -> samples, through the real commands."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch

from data.codes import CodeFileError, CodeWriter, read_manifest
from helpers import CONFIGS, train
from stage1 import CheckpointKindError, load_tokenizer
from tokenforge.evaluate import main as evaluate
from tokenforge.runs import open_run
from tokenforge.sample import main as sample
from tokenforge.tokenize import main as tokenize


def test_load_tokenizer_round_trips_and_matches_the_code_files(tokenizer_and_codes):
    ckpt, codes = tokenizer_and_codes
    tok = load_tokenizer(ckpt)
    assert not tok.training
    dm = open_run(ckpt).datamodule(batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.split_dataloader("train")))
    c = tok.encode(batch["x"])
    stored = np.load(codes / "train-00000.npy")
    assert stored.dtype == np.uint16
    assert torch.equal(c, torch.from_numpy(stored[:8].astype(np.int64))), "tokenize wrote other codes"
    again = load_tokenizer(ckpt)
    assert torch.equal(again.encode(batch["x"]), c)
    xrec = tok.decode(c)
    assert xrec.shape == batch["x"].shape
    # Decoding is a function of the codes: the same codes give the same images, and re-encoding a
    # decoded image mostly recovers its codes.
    assert torch.equal(tok.decode(c), xrec)
    assert (tok.encode(xrec) == c).float().mean() > 0.5


class SimulatedKill(RuntimeError):
    """Stands for a kill mid-run (Lightning turns a real KeyboardInterrupt into sys.exit(1))."""


def test_interrupted_tokenize_resumes_with_identical_bytes(tokenizer_and_codes, tmp_path, monkeypatch):
    ckpt, reference = tokenizer_and_codes
    out = tmp_path / "codes"
    original = CodeWriter.write_shard
    calls = {"n": 0}

    def dying_write(self, *args, **kwargs):
        if calls["n"] == 2:
            raise SimulatedKill("simulated kill")
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CodeWriter, "write_shard", dying_write)
    with pytest.raises(SimulatedKill):
        tokenize([str(ckpt), "--out", str(out), "--shard-size", "64", "--batch-size", "32"])
    assert len(list(out.glob("train-*.npy"))) == 2 + 2  # two shards: codes + labels files
    monkeypatch.setattr(CodeWriter, "write_shard", original)
    tokenize([str(ckpt), "--out", str(out), "--shard-size", "64", "--batch-size", "32"])
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        if name != "manifest.json":
            assert filecmp.cmp(reference / name, out / name, shallow=False), f"{name} differs after resume"
    assert read_manifest(out)["splits"] == read_manifest(reference)["splits"]


def test_a_folder_of_another_tokenizer_is_refused(tokenizer_and_codes, tmp_path):
    ckpt, codes = tokenizer_and_codes
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 1.0
    torch.save(state, other)
    with pytest.raises(CodeFileError, match="another tokenizer"):
        tokenize([str(other), "--out", str(codes), "--shard-size", "64"])


def test_evaluate_prints_every_field(tokenizer_and_codes, tmp_path, capsys):
    ckpt, _ = tokenizer_and_codes
    out_json = tmp_path / "eval.json"
    results = evaluate([str(ckpt), "--json", str(out_json), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    for field in ("mse", "psnr", "ssim", "usage", "perplexity", "dead_codes", "num_examples"):
        assert field in results and field in printed, field
    stored = json.loads(out_json.read_text())
    assert stored["num_examples"] == 64 and 0 < stored["usage"] <= 1
    assert stored["dead_codes"] == round((1 - stored["usage"]) * stored["codebook_size"])
    assert (tmp_path / "eval" / "usage_histogram.png").is_file()


def test_a_prior_checkpoint_is_refused_as_a_tokenizer(tokenizer_and_codes, tmp_path):
    _, codes = tokenizer_and_codes
    train(CONFIGS / "smoke" / "ar.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=2",
                                                     "trainer.val_check_interval=2"])
    with pytest.raises(CheckpointKindError, match="prior"):
        load_tokenizer(tmp_path / "ar" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("prior,flags", [("ar", ["--top-k", "20", "--cfg", "1.5"]),
                                         ("maskgit", ["--steps", "4", "--cfg", "1.0"])])
def test_prior_samples_decode_to_images(prior, flags, tokenizer_and_codes, tmp_path):
    ckpt, codes = tokenizer_and_codes
    train(CONFIGS / "smoke" / f"{prior}.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=6",
                                                          "trainer.val_check_interval=6"])
    out = sample([str(tmp_path / prior / "checkpoints" / "last.ckpt"), "-n", "6", "--class", "3", "7",
                  "--out", str(tmp_path / "samples"), *flags])
    record = json.loads((out / "samples.json").read_text())
    assert record["classes"] == [3, 7, 3, 7, 3, 7]
    assert record["code_shape"] == [6, 7, 7]
    assert record["sampling"]["cfg_scale"] == float(flags[-1])
    from PIL import Image

    assert Image.open(out / "00005.png").size == (28, 28)
    assert (out / "grid.png").is_file()
    codes_out = np.load(out / "codes.npy")
    assert codes_out.min() >= 0 and codes_out.max() < load_tokenizer(ckpt).code_spec["codebook_size"]


@pytest.fixture()
def random_classifier(tmp_path):
    from metrics.domain_classifier import DomainClassifier

    torch.manual_seed(0)
    path = tmp_path / "clf.pt"
    DomainClassifier(in_channels=1, num_classes=10, image_size=28).save(path)
    return path


def test_evaluate_tokenizer_with_domain_fid_writes_every_field_and_the_report(tokenizer_and_codes, tmp_path,
                                                                              random_classifier):
    ckpt, _ = tokenizer_and_codes
    res = evaluate([str(ckpt), "--classifier", str(random_classifier), "--fid", "domain", "--lpips", "none",
                    "--out", str(tmp_path / "ev")])
    for field in ("mse", "psnr", "ssim", "usage", "perplexity", "dead_codes", "rfid", "rfid_features",
                  "rfid_num_real", "rfid_resolution"):
        assert field in res, field
    assert res["rfid"] >= 0 and res["rfid_num_real"] == res["rfid_num_fake"] == 64
    assert res["rfid_features"].startswith("domain classifier") and "clf.pt" in res["rfid_features"]
    assert res["rfid_resolution"] == [28, 28]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "rfid" in report and "reconstructions.png" in report and "usage_histogram.png" in report
    assert "not Inception" in report


def test_evaluate_prior_reports_fid_precision_recall_and_classifier_accuracy(tokenizer_and_codes, tmp_path,
                                                                            random_classifier):
    _, codes = tokenizer_and_codes
    train(CONFIGS / "smoke" / "ar.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=4",
                                                     "trainer.val_check_interval=4"])
    res = evaluate([str(tmp_path / "ar" / "checkpoints" / "last.ckpt"), "--classifier", str(random_classifier),
                    "--num-samples", "20", "--top-k", "10", "--out", str(tmp_path / "ev")])
    for field in ("fid", "fid_features", "precision", "recall", "classifier_accuracy", "sample_code_usage"):
        assert field in res, field
    assert res["fid_num_fake"] == 20 and res["class_balanced"] is True
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0 and 0 <= res["classifier_accuracy"] <= 1
    assert (tmp_path / "ev" / "samples.png").is_file() and (tmp_path / "ev" / "report.md").is_file()


def test_asking_for_inception_without_weights_is_the_documented_error(tokenizer_and_codes, tmp_path):
    from metrics.weights import MissingWeightsError

    ckpt, _ = tokenizer_and_codes
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty_hub"))
    try:
        with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
            evaluate([str(ckpt), "--fid", "inception", "--out", str(tmp_path / "ev")])
    finally:
        torch.hub.set_dir(old)
