"""The code-file format: writing, resuming, reading back, and refusing what does not fit."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from data.codes import (
    CodeDataset,
    CodeFileError,
    CodesDataModule,
    CodeWriter,
    MissingCodesError,
    sha256_file,
)

SPEC = {"grid": [4, 4], "depth": None, "codebook_size": 1000, "continuous_dim": None}
TOKENIZER = "runs/vq/last.ckpt"
SHA = "a" * 64


def make_split(n: int, spec=SPEC, seed: int = 0, labels: bool = True):
    rng = np.random.default_rng(seed)
    shape = (n, *spec["grid"]) + ((spec["depth"],) if spec["depth"] else ())
    codes = rng.integers(0, spec["codebook_size"], shape)
    return codes, (rng.integers(0, 7, n) if labels else None)


class Killed(Exception):
    """Stands in for SIGKILL between two shards."""


def tokenize(folder, splits, shard_size=16, stop_after=None, spec=SPEC, sha=SHA, finalize=True):
    """What the tokenize command does: skip finished shards, write the rest, finalize; returns those written."""
    writer = CodeWriter(folder, spec, TOKENIZER, sha, shard_size=shard_size)
    written = []
    for split, (codes, labels) in splits.items():
        for i in range(writer.num_shards(len(codes))):
            if writer.has_shard(split, i):
                continue
            if stop_after is not None and len(written) == stop_after:
                raise Killed
            lo, hi = writer.shard_bounds(i, len(codes))
            shard_labels = None if labels is None else labels[lo:hi]
            writer.write_shard(split, i, torch.from_numpy(codes[lo:hi]), shard_labels)
            written.append((split, i))
    if finalize:
        writer.finalize()
    return written


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture()
def splits():
    return {"train": make_split(50, seed=0), "val": make_split(13, seed=1)}


def test_round_trip_uint16_and_manifest(tmp_path, splits):
    tokenize(tmp_path, splits)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [f"train-0000{i}{kind}.npy" for i in range(4) for kind in (".labels", "")]
    assert names == ["manifest.json", *shards, "val-00000.labels.npy", "val-00000.npy"]
    assert np.load(tmp_path / "train-00000.npy").dtype == np.uint16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "tokenforge-codes" and manifest["version"] == 1 and manifest["complete"]
    assert manifest["tokenizer"] == {"path": TOKENIZER, "sha256": SHA} and manifest["code_spec"] == SPEC
    assert manifest["splits"]["train"]["count"] == 50 and manifest["splits"]["val"]["count"] == 13
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [16, 16, 16, 2]
    assert manifest["num_classes"] == max(splits["train"][1].max(), splits["val"][1].max()) + 1

    for split, (codes, labels) in splits.items():
        ds = CodeDataset(tmp_path, split)
        batch = ds.__getitems__(list(range(len(ds))))
        assert batch["codes"].dtype == torch.long and batch["label"].dtype == torch.long
        assert np.array_equal(batch["codes"].numpy(), codes)
        assert np.array_equal(batch["label"].numpy(), labels)
        # Random access across shard boundaries keeps the requested order.
        order = [len(ds) - 1, 0, 17, 16, 15]
        if split == "train":
            assert np.array_equal(ds.__getitems__(order)["codes"].numpy(), codes[order])
        assert torch.equal(ds[-1]["codes"], torch.from_numpy(codes[-1]).long())
    # Workers get the dataset pickled: the memory maps are re-opened, not copied.
    clone = pickle.loads(pickle.dumps(CodeDataset(tmp_path, "train")))
    assert np.array_equal(clone[20]["codes"].numpy(), splits["train"][0][20])


def test_datamodule_loaders_limits_and_exposed_fields(tmp_path, splits):
    tokenize(tmp_path, splits)
    dm = CodesDataModule(str(tmp_path), batch_size=8, limit_train=20)
    assert dm.code_spec == SPEC and dm.tokenizer_path == TOKENIZER
    assert dm.num_classes == int(max(splits["train"][1].max(), splits["val"][1].max())) + 1
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert sum(len(b["codes"]) for b in train) == 20 and train[0]["codes"].shape == (8, 4, 4)
    seen = torch.cat([b["codes"] for b in train]).numpy()
    assert sorted(map(bytes, seen.astype(np.int64))) == sorted(map(bytes, splits["train"][0][:20]))
    val = list(dm.val_dataloader())  # unshuffled: the written order
    assert np.array_equal(torch.cat([b["codes"] for b in val]).numpy(), splits["val"][0])
    assert np.array_equal(torch.cat([b["label"] for b in val]).numpy(), splits["val"][1])


def test_int32_for_large_codebooks_depth_and_no_labels(tmp_path):
    spec = {"grid": [3], "depth": 2, "codebook_size": 70000, "continuous_dim": None}
    codes, _ = make_split(10, spec, labels=False)
    tokenize(tmp_path, {"train": (codes, None)}, shard_size=4, spec=spec)
    assert np.load(tmp_path / "train-00000.npy").dtype == np.int32
    assert not list(tmp_path.glob("*.labels.npy"))
    dm = CodesDataModule(str(tmp_path), batch_size=4)
    assert dm.num_classes is None
    dm.setup("fit")
    assert dm.val_dataloader() == []  # no val split: Lightning skips validation
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"codes"} and batch["codes"].shape == (4, 3, 2)


def test_killed_run_resumes_to_identical_bytes(tmp_path, splits):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    tokenize(whole, splits)
    with pytest.raises(Killed):
        tokenize(resumed, splits, stop_after=2)
    partial = json.loads((resumed / "manifest.json").read_text())
    assert not partial["complete"] and partial["splits"]["train"]["count"] == 32
    with pytest.raises(CodeFileError, match="allow_incomplete=true"):
        CodesDataModule(str(resumed))  # a half-written folder is refused unless the user says so
    with pytest.warns(UserWarning, match="unfinished"):
        CodesDataModule(str(resumed), allow_incomplete=True)
    (resumed / ".train-00002.npy.x1y2.tmp").write_bytes(b"half a shard")  # a kill in mid-write
    written = tokenize(resumed, splits)
    assert written == [("train", 2), ("train", 3), ("val", 0)]  # only what was missing
    assert folder_bytes(resumed) == folder_bytes(whole)


def test_ranks_write_disjoint_shards_and_finalize_lists_all(tmp_path, splits):
    codes, labels = splits["train"]
    ranks = [CodeWriter(tmp_path / "ddp", SPEC, TOKENIZER, SHA, shard_size=16) for _ in range(2)]
    for i in range(4):  # shard i goes to rank i % 2, as a distributed sampler would deal them
        lo, hi = ranks[i % 2].shard_bounds(i, len(codes))
        ranks[i % 2].write_shard("train", i, codes[lo:hi], labels[lo:hi])
    # Each rank's own manifest knows only part of the work; finalize reads the disk.
    manifest = ranks[0].finalize()
    assert [s["index"] for s in manifest["splits"]["train"]["shards"]] == [0, 1, 2, 3]
    tokenize(tmp_path / "single", {"train": splits["train"]})
    assert folder_bytes(tmp_path / "ddp") == folder_bytes(tmp_path / "single")


def test_finalize_refuses_a_gap(tmp_path, splits):
    codes, labels = splits["train"]
    writer = CodeWriter(tmp_path, SPEC, TOKENIZER, SHA, shard_size=16)
    writer.write_shard("train", 0, codes[:16], labels[:16])
    writer.write_shard("train", 2, codes[32:48], labels[32:48])
    with pytest.raises(CodeFileError, match=r"lacks shards \[1\]"):
        writer.finalize()


def test_other_tokenizer_is_refused(tmp_path, splits):
    tokenize(tmp_path, splits)
    with pytest.raises(CodeFileError) as err:
        CodeWriter(tmp_path, SPEC, "runs/other/last.ckpt", "b" * 64, shard_size=16)
    msg = str(err.value)
    assert "made by another tokenizer" in msg and SHA in msg and "b" * 64 in msg
    assert TOKENIZER in msg and "runs/other/last.ckpt" in msg and "--out" in msg and "delete" in msg
    with pytest.raises(CodeFileError, match="shard_size"):
        CodeWriter(tmp_path, SPEC, TOKENIZER, SHA, shard_size=8)
    (tmp_path.parent / "notes").mkdir()
    (tmp_path.parent / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CodeFileError, match="not a code folder"):
        CodeWriter(tmp_path.parent / "notes", SPEC, TOKENIZER, SHA)


def test_write_shard_checks_shape_and_range(tmp_path):
    writer = CodeWriter(tmp_path, SPEC, TOKENIZER, SHA, shard_size=16)
    with pytest.raises(CodeFileError, match="do not match the code spec"):
        writer.write_shard("train", 0, np.zeros((2, 4, 5), np.int64))
    with pytest.raises(CodeFileError, match="outside the codebook"):
        writer.write_shard("train", 0, np.full((2, 4, 4), 1000))
    with pytest.raises(CodeFileError, match="1..16 items"):
        writer.write_shard("train", 0, np.zeros((17, 4, 4), np.int64))
    assert not writer.has_shard("train", 0)


def test_corrupt_or_mismatched_shards_name_the_file(tmp_path, splits):
    tokenize(tmp_path, splits)
    shard = tmp_path / "train-00001.npy"
    good = shard.read_bytes()

    shard.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CodeFileError, match=f"{shard}.*corrupt"):
        CodeDataset(tmp_path, "train")

    np.save(shard, np.zeros((16, 4, 4), np.int32))  # right count, wrong dtype
    with pytest.raises(CodeFileError, match=f"{shard} holds int32"):
        CodeDataset(tmp_path, "train")

    np.save(shard, np.zeros((15, 4, 4), np.uint16))  # a shard that disagrees with the manifest's count
    with pytest.raises(CodeFileError, match=f"{shard} holds uint16 \\(15, 4, 4\\)"):
        CodeDataset(tmp_path, "train")

    flipped = bytearray(good)
    flipped[-1] ^= 1  # same header, one code changed: only the checksum can tell
    shard.write_bytes(bytes(flipped))
    CodeDataset(tmp_path, "train", verify=False)  # only the opt-out skips the checksum
    with pytest.raises(CodeFileError, match=f"{shard}.*SHA-256"):
        CodeDataset(tmp_path, "train")  # verified by default

    shard.unlink()
    with pytest.raises(CodeFileError, match=f"{shard}.*missing"):
        CodeDataset(tmp_path, "train")
    with pytest.raises(CodeFileError, match="no split 'test'"):
        CodeDataset(tmp_path, "test")


def test_missing_folder_or_manifest_names_the_tokenize_command(tmp_path):
    with pytest.raises(MissingCodesError, match=f"{tmp_path / 'nope'} does not exist.*scripts/tokenize.py"):
        CodesDataModule(str(tmp_path / "nope"))
    with pytest.raises(MissingCodesError, match="has no manifest.json.*scripts/tokenize.py") as err:
        CodeDataset(tmp_path, "train")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, CodeFileError)


def test_sha256_file_is_chunked_and_exact(tmp_path):
    path = tmp_path / "blob.bin"
    payload = np.random.default_rng(0).bytes(10_000)
    path.write_bytes(payload)
    assert sha256_file(path, chunk_size=333) == hashlib.sha256(payload).hexdigest() == sha256_file(path)


# -- hostile or damaged folders (issue 11) --------------------------------------------------------------
def _rewrite(folder, name, array):
    """Replace a file and update its hash in the manifest, as a consistent but hostile folder would."""
    np.save(folder / name, array)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        for key, sha_key in (("file", "sha256"), ("labels", "labels_sha256")):
            if entry.get(key) == name:
                entry[sha_key] = sha256_file(folder / name)
                entry.pop("min_code", None), entry.pop("max_code", None)
                if key == "labels":
                    entry["max_label"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_codes_outside_the_codebook_are_refused_when_the_shard_opens(tmp_path, splits, monkeypatch):
    monkeypatch.setenv("TOKENFORGE_CACHE", str(tmp_path / "cache"))
    tokenize(tmp_path / "f", splits)
    codes = np.load(tmp_path / "f" / "train-00001.npy")
    codes[3, 1, 2] = SPEC["codebook_size"]  # MaskGIT would read this as its mask token
    _rewrite(tmp_path / "f", "train-00001.npy", codes)
    with pytest.raises(CodeFileError, match=r"train-00001.npy holds codes in \[\d+, 1000\], outside the codebook"):
        CodeDataset(tmp_path / "f", "train")


def test_labels_outside_the_classes_are_refused_when_the_shard_opens(tmp_path, splits, monkeypatch):
    monkeypatch.setenv("TOKENFORGE_CACHE", str(tmp_path / "cache"))
    tokenize(tmp_path / "f", splits)
    labels = np.load(tmp_path / "f" / "train-00000.labels.npy")
    num_classes = json.loads((tmp_path / "f" / "manifest.json").read_text())["num_classes"]
    labels[0] = num_classes  # would silently become the null class of classifier-free guidance
    _rewrite(tmp_path / "f", "train-00000.labels.npy", labels)
    with pytest.raises(CodeFileError, match="outside the folder's classes"):
        CodeDataset(tmp_path / "f", "train")


def test_recorded_ranges_are_checked_when_the_manifest_is_read(tmp_path, splits):
    tokenize(tmp_path, splits)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    assert 0 <= entry["min_code"] <= entry["max_code"] < SPEC["codebook_size"]  # recorded by the writer
    entry["max_code"] = SPEC["codebook_size"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CodeFileError, match="outside the codebook"):
        CodesDataModule(str(tmp_path))


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", "sub/train-00000.npy", "val-00000.npy"])
def test_manifest_shard_names_cannot_leave_the_folder(tmp_path, splits, name):
    folder = tmp_path / "f"
    tokenize(folder, splits)
    np.save(tmp_path / "outside.npy", np.zeros((16, 4, 4), np.uint16))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CodeFileError, match="only name files inside its folder"):
        CodeDataset(folder, "train")


def test_a_symlinked_shard_pointing_outside_is_refused(tmp_path, splits):
    folder = tmp_path / "f"
    tokenize(folder, splits)
    outside = tmp_path / "outside.npy"
    (folder / "train-00000.npy").rename(outside)
    (folder / "train-00000.npy").symlink_to(outside)
    with pytest.raises(CodeFileError, match="outside the code folder"):
        CodeDataset(folder, "train", verify=False)


def test_verified_shards_are_not_hashed_again(tmp_path, splits, monkeypatch):
    import data.codes as codes_mod

    monkeypatch.setenv("TOKENFORGE_CACHE", str(tmp_path / "cache"))
    tokenize(tmp_path / "f", splits)
    calls = []
    real = codes_mod.sha256_file
    monkeypatch.setattr(codes_mod, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    CodeDataset(tmp_path / "f", "train")
    assert len(calls) == 8  # 4 shards: codes and labels
    calls.clear()
    CodeDataset(tmp_path / "f", "train")
    assert calls == [], "a verified, unchanged shard is read from the per-user cache"
    shard = tmp_path / "f" / "train-00002.npy"
    flipped = bytearray(shard.read_bytes())
    flipped[-1] ^= 1
    shard.write_bytes(bytes(flipped))  # changed after verification: checked again, and refused
    with pytest.raises(CodeFileError, match="SHA-256"):
        CodeDataset(tmp_path / "f", "train")
