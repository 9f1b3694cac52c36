"""Attacks on configs, checkpoints and code folders, tried the way an attacker would (issue 11).

Every "gadget" below is a real callable of this project that writes a file: named as a ``target``
it would turn a YAML file, a command-line override, a checkpoint or a shared code folder into an
arbitrary file write (a ``.pth`` file in ``site-packages`` runs code at the next interpreter start).
Each route must be refused with a named error, and the target file must not exist afterwards.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from layers.instantiate import PROJECT_PACKAGES, ConfigError, TargetNotAllowedError, instantiate, resolve_target
from stage1.tokenizer import CHECKPOINT_KEY, CorruptCheckpointError, Tokenizer, load_tokenizer, read_checkpoint
from tokenforge.config import PathNotAllowedError, load_config, section_bases, to_plain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VQVAE = CONFIGS / "smoke" / "vqvae.yaml"

# Project callables that write files when called. Functions are refused as targets; CodeWriter is a
# class whose constructor writes a manifest, refused because it is no component of any site.
WRITE_GADGETS = ["data.atomic.atomic_write_text", "data.atomic.atomic_write", "data.codes._dump_manifest",
                 "data.cache.save_npy_atomic", "data.cache.cached_array", "tokenforge.train.main",
                 "tokenforge.tokenize.main", "tokenforge.sample.main", "tokenforge.evaluate.main",
                 "tokenforge.usage_plot.save_usage_histogram", "data.codes.CodeWriter"]


def site_bases() -> dict[str, type]:
    from layers.moe.routers import Router
    from stage1.quantizers.base import Quantizer
    from stage2.prior import Prior

    return {**section_bases(), "module": nn.Module, "quantizer": Quantizer, "router": Router,
            "tokenizer": Tokenizer, "prior": Prior}


def write_spec(evil: Path) -> dict:
    return {"target": "data.atomic.atomic_write_text", "params": {"path": str(evil), "text": "import os\n"}}


def flow(spec: dict) -> str:
    """A spec as a YAML flow mapping (for dotlist overrides)."""
    params = ", ".join(f"{k}: '{v}'" for k, v in spec["params"].items())
    return f"{{target: {spec['target']}, params: {{{params}}}}}"


@pytest.fixture()
def evil(tmp_path) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir()
    return site / "evil.pth"


# -- configs ----------------------------------------------------------------------------------------
def test_every_write_gadget_is_refused_at_every_site():
    for path in WRITE_GADGETS:
        module, _, name = path.rpartition(".")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if not hasattr(mod, name):
            continue
        for site, base in site_bases().items():
            with pytest.raises(TargetNotAllowedError):
                resolve_target(path, base=base, where=site)


def test_yaml_model_and_callback_gadgets_are_refused_and_write_nothing(tmp_path, evil):
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(VQVAE))
    for section in ("model", "callbacks"):
        cfg = dict(base)
        if section == "model":
            cfg["model"] = write_spec(evil)
        else:
            cfg["callbacks"] = [write_spec(evil)]
        path = tmp_path / f"{section}.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        with pytest.raises(TargetNotAllowedError, match="not a class"):
            load_config(path)
        from tokenforge.train import main

        with pytest.raises(TargetNotAllowedError):
            main([str(path), "--runs", str(tmp_path / "runs")])
        assert not evil.exists()
        assert not (tmp_path / "runs" / section).exists(), "a refused config must not leave a run folder"


def test_dotlist_override_gadgets_are_refused(evil):
    spec = write_spec(evil)
    for override in (f"model={flow(spec)}", f"model.params.quantizer={flow(spec)}", f"callbacks=[{flow(spec)}]",
                     "data.target=data.atomic.atomic_write_text",
                     "model.target=data.atomic.atomic_write_text", "data.target=data.codes.CodeWriter",
                     "model.params.quantizer.target=data.cache.cached_array"):
        with pytest.raises(TargetNotAllowedError):
            load_config(VQVAE, [override])
    assert not evil.exists()


def test_classes_of_the_wrong_kind_private_and_reexported_names_are_refused():
    bases = section_bases()
    with pytest.raises(TargetNotAllowedError, match="LightningModule"):
        resolve_target("data.images.ImageDataModule", base=bases["model"])
    with pytest.raises(TargetNotAllowedError, match="LightningDataModule"):
        resolve_target("stage1.vqvae.VQVAE", base=bases["data"])
    with pytest.raises(TargetNotAllowedError, match="private"):
        resolve_target("data.codes._dump_manifest")
    with pytest.raises(TargetNotAllowedError, match="outside the allowed"):
        resolve_target("data.codes.Path")  # pathlib.Path, imported into a project module
    with pytest.raises(TargetNotAllowedError, match="a module"):
        resolve_target("data.codes.np")
    with pytest.raises(TargetNotAllowedError, match="not allowed"):
        resolve_target("pytorch_lightning.loggers.CSVLogger", base=bases["callbacks"])


def test_a_quantizer_site_refuses_any_other_module(tmp_path):
    cfg = to_plain(load_config(VQVAE))
    cfg["model"]["params"]["quantizer"] = {"target": "torch.nn.Linear", "params": {"in_features": 8}}
    with pytest.raises(TargetNotAllowedError, match="Quantizer"):
        instantiate(cfg["model"], where="model", base=section_bases()["model"])


def test_callback_paths_stay_inside_the_run_folder(tmp_path):
    from tokenforge.config import confine_paths

    run = tmp_path / "run"
    assert confine_paths({"out_dir": "images"}, run, "callbacks[0]") == {"out_dir": str(run / "images")}
    for bad in ({"out_dir": str(tmp_path / "site-packages")}, {"dirpath": "../elsewhere"}, {"filename": "../../x"},
                {"out_dir": "~/x"}):
        with pytest.raises(PathNotAllowedError, match="inside the run"):
            confine_paths(bad, run, "callbacks[0]")


def test_yaml_python_tags_never_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "tag.yaml"
    bad.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\ndata: {{}}\n")
    with pytest.raises(ConfigError, match="not a valid config"):
        load_config(bad)
    assert not marker.exists()


def test_scan_no_public_callable_but_component_classes_can_be_instantiated():
    """Walk every public callable of the project's packages: a target resolves only when it is a
    public class of the base the site asks for, never a function, a module or another class."""
    bases = site_bases()
    accepted, refused = 0, 0
    for package in PROJECT_PACKAGES:
        try:
            pkg = importlib.import_module(package)
        except ImportError:
            continue
        names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
        for module_name in names:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # an optional dependency or a module in the middle of an edit elsewhere
                continue
            for name, obj in vars(module).items():
                if name.startswith("_") or not callable(obj):
                    continue
                path = f"{module_name}.{name}"
                for site, base in bases.items():
                    try:
                        got = resolve_target(path, base=base, where=site)
                    except ConfigError:
                        refused += 1
                        continue
                    accepted += 1
                    assert inspect.isclass(got) and issubclass(got, base), f"{path} resolved at {site}"
                    assert not got.__qualname__.startswith("_")
    assert accepted > 50 and refused > 1000, (accepted, refused)


# -- checkpoints ------------------------------------------------------------------------------------
def tiny_tokenizer():
    cfg = to_plain(load_config(VQVAE))
    model = instantiate(cfg["model"], where="model", base=section_bases()["model"])
    return cfg, model


def save_checkpoint(model, path: Path, **meta) -> Path:
    """A checkpoint as the train command writes it (hyper-parameters, weights, metadata), then edited."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    ckpt[CHECKPOINT_KEY].update(meta)
    torch.save(ckpt, path)
    return path


def test_checkpoint_target_gadget_is_refused_and_writes_nothing(tmp_path, evil):
    ckpt = {"state_dict": {}, "hyper_parameters": write_spec(evil)["params"],
            CHECKPOINT_KEY: {"kind": "tokenizer", "target": "data.atomic.atomic_write_text", "format_version": 1}}
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(TargetNotAllowedError):
        load_tokenizer(path)
    from tokenforge.runs import open_run

    with pytest.raises(TargetNotAllowedError):
        open_run(path)
    assert not evil.exists()


def test_checkpoint_target_of_another_kind_is_refused(tmp_path):
    _, model = tiny_tokenizer()
    path = save_checkpoint(model, tmp_path / "t.ckpt", target="stage2.ar.ARPrior")
    with pytest.raises(TargetNotAllowedError, match="Tokenizer"):
        load_tokenizer(path)


def test_checkpoint_hyperparameters_cannot_smuggle_a_gadget(tmp_path):
    _, model = tiny_tokenizer()
    path = tmp_path / "t.ckpt"
    save_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)
    folder = tmp_path / "written-by-codewriter"
    ckpt["hyper_parameters"]["quantizer"] = {"target": "data.codes.CodeWriter", "params": {
        "folder": str(folder), "code_spec": {"grid": [1], "codebook_size": 2}, "tokenizer_path": "x",
        "tokenizer_sha256": "0"}}
    torch.save(ckpt, path)
    with pytest.raises(TargetNotAllowedError, match="Quantizer"):
        load_tokenizer(path)
    assert not folder.exists()


def test_data_config_stored_in_a_checkpoint_is_checked_like_a_config(tmp_path, evil):
    cfg, model = tiny_tokenizer()
    path = save_checkpoint(model, tmp_path / "t.ckpt", config={**cfg, "data": write_spec(evil)})
    from tokenforge.runs import open_run

    run = open_run(path)  # the tokenizer itself is fine
    with pytest.raises(TargetNotAllowedError):
        run.datamodule()
    from tokenforge.tokenize import main as tokenize

    with pytest.raises(TargetNotAllowedError):
        tokenize([str(path), "--out", str(tmp_path / "codes")])
    assert not evil.exists()


def test_a_checkpoint_cannot_choose_where_the_data_cache_is_written(tmp_path):
    cfg, model = tiny_tokenizer()
    elsewhere = tmp_path / "elsewhere"
    cfg["data"]["params"]["cache_dir"] = str(elsewhere)
    path = save_checkpoint(model, tmp_path / "t.ckpt", config=cfg)
    from tokenforge.runs import open_run

    run = open_run(path)
    assert run.datamodule().cache_dir is None  # the user's own default cache
    assert run.datamodule([f"data.params.cache_dir={elsewhere}"]).cache_dir == str(elsewhere)  # the user's choice


# -- a prior and the tokenizer it records --------------------------------------------------------------
def write_code_folder(folder: Path, spec: dict, tokenizer_path: str, sha: str, n: int = 32) -> None:
    from data.codes import CodeWriter

    writer = CodeWriter(folder, spec, tokenizer_path=tokenizer_path, tokenizer_sha256=sha, shard_size=n)
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        shape = (n, *spec["grid"]) + ((spec["depth"],) if spec.get("depth") else ())
        writer.write_shard(split, 0, torch.randint(0, spec["codebook_size"], shape, generator=g),
                           torch.arange(n) % 3)
    writer.finalize()


def prior_on(folder: Path):
    cfg = to_plain(load_config(CONFIGS / "smoke" / "ar.yaml", [f"data.params.codes={folder}"]))
    return instantiate(cfg["model"], where="model", base=section_bases()["model"])


def test_a_code_folder_naming_a_crafted_tokenizer_cannot_write_files(tmp_path, evil):
    crafted = tmp_path / "shared" / "tokenizer.ckpt"
    crafted.parent.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": write_spec(evil)["params"],
                CHECKPOINT_KEY: {"kind": "tokenizer", "target": "data.atomic.atomic_write_text"}}, crafted)
    _, tok = tiny_tokenizer()
    write_code_folder(tmp_path / "codes", tok.code_spec, str(crafted), "0" * 64)  # the manifest names it
    prior = prior_on(tmp_path / "codes")
    path = save_checkpoint(prior, tmp_path / "prior.ckpt")
    from tokenforge.runs import open_run

    shown = []
    with pytest.raises(TargetNotAllowedError):
        open_run(path, log=shown.append)
    assert not evil.exists()
    assert any(str(crafted) in line for line in shown), "the recorded tokenizer path is shown to the user"


def test_recorded_tokenizer_resolves_beside_the_checkpoint_and_its_hash_is_checked(tmp_path, monkeypatch):
    from data.codes import sha256_file
    from tokenforge.runs import TokenizerMismatchError, open_run

    run_dir = tmp_path / "moved" / "checkpoints"
    run_dir.mkdir(parents=True)
    _, tok = tiny_tokenizer()
    tok_path = save_checkpoint(tok, run_dir / "tok.ckpt")
    write_code_folder(tmp_path / "codes", tok.code_spec, str(tok_path), sha256_file(tok_path))
    prior = prior_on(tmp_path / "codes")
    path = save_checkpoint(prior, run_dir / "prior.ckpt",
                           tokenizer={"path": "tok.ckpt", "sha256": sha256_file(tok_path)})
    monkeypatch.chdir(tmp_path)  # "tok.ckpt" does not exist here: only beside the checkpoint
    shown = []
    run = open_run(path, log=shown.append)
    assert run.kind == "prior" and run.tokenizer_path == run_dir / "tok.ckpt"
    assert isinstance(run.tokenizer, Tokenizer) and "SHA-256 checked" in shown[0]

    other = tiny_tokenizer()[1]
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_checkpoint(other, run_dir / "tok.ckpt")  # same path, different weights
    with pytest.raises(TokenizerMismatchError, match="SHA-256"):
        open_run(path, log=shown.append)


# -- corrupt and hostile files ---------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "pickle", "directory"])
def test_corrupt_or_hostile_checkpoints_give_one_line_errors(tmp_path, kind):
    _, model = tiny_tokenizer()
    good = save_checkpoint(model, tmp_path / "good.ckpt")
    path = tmp_path / "bad.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    elif kind == "pickle":
        torch.save({"state_dict": {}, "x": Payload()}, path)
    else:
        path.mkdir()
    expected = IsADirectoryError if kind == "directory" else CorruptCheckpointError
    with pytest.raises(expected) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    if kind == "pickle":
        assert "nothing in it was run" in str(err.value)


def test_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    from tokenforge.cli import run

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    assert run("evaluate", [str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad) in err


def test_scripts_run_the_checkout_that_holds_them(tmp_path):
    """A second checkout's scripts import that checkout's packages, not the editable install's."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "worktree"
    shutil.copytree(root / "scripts", other / "scripts")
    (other / "tokenforge").mkdir()
    (other / "tokenforge" / "__init__.py").write_text("")
    (other / "tokenforge" / "cli.py").write_text(
        "import sys, tokenize\n"
        "def main(command):\n"
        "    print('other checkout', command, hasattr(tokenize, 'generate_tokens'))\n")
    for script in ("train.py", "tokenize.py"):
        r = subprocess.run([sys.executable, str(other / "scripts" / script)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        # the stdlib's tokenize (not scripts/tokenize.py) and this worktree's tokenforge
        assert r.stdout.strip() == f"other checkout {script[:-3]} True", r.stdout


def test_lightning_base_classes_are_what_the_sections_expect():
    bases = section_bases()
    assert bases["model"] is pl.LightningModule and bases["data"] is pl.LightningDataModule
    assert bases["callbacks"] is pl.Callback


@pytest.mark.parametrize("argv", [["-n", "0"], ["--batch-size", "0"], ["--cfg", "-1"], ["--top-k", "0"]])
def test_nonsense_numbers_fail_while_parsing_before_any_model_loads(tmp_path, argv, capsys):
    from tokenforge.sample import main as sample

    with pytest.raises(SystemExit) as err:
        sample([str(tmp_path / "missing.ckpt"), *argv])  # the checkpoint is never opened
    assert err.value.code == 2 and argv[0] in capsys.readouterr().err
