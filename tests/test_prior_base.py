"""The shared prior base: optimiser groups, schedule, signatures, sampling options, code layouts,
label dropout, the conditioning-grid hook, legacy checkpoints and training through a frozen tokenizer."""

from __future__ import annotations

import argparse
import inspect
import math

import pytest
import torch
from torch import Tensor

from helpers import SYNTHETIC_SPEC
from layers.instantiate import ConfigError, check_params
from stage2.ar import ARPrior
from stage2.code_layout import CodeLayout
from stage2.embedding import CodeEmbedding
from stage2.maskgit import MaskGITPrior
from stage2.optim import parameter_groups, warmup_cosine
from stage2.options import TOKEN_SAMPLING, SamplingOption, add_sampling_flags, sampling_kwargs
from stage2.prior import Prior, PriorLoss, load_prior, sampling_options_of

TINY = {"dim": 32, "depth": 2, "heads": 4}


def _ar(**kw) -> ARPrior:
    return ARPrior(**{"code_spec": SYNTHETIC_SPEC, "num_classes": 3, **TINY, **kw})


# ------------------------------------------------------------------------------------ optimisation
def test_no_weight_decay_on_norms_biases_and_embeddings():
    moe = {"target": "layers.moe.MoE", "params": {"num_experts": 2, "top_k": 1, "hidden_dim": 16}}
    model = MaskGITPrior(code_spec={**SYNTHETIC_SPEC, "depth": 2}, num_classes=3, positions="learned", ffn=moe,
                         **TINY)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(exempt) and decayed | exempt == set(names.values())
    for name in ("embed.tokens.weight", "embed.levels.weight", "classes.table.weight", "head.bias"):
        assert name in exempt, name
    assert any("pos" in n for n in exempt)  # the learned position table
    assert any("norm" in n for n in exempt) and not any("norm" in n for n in decayed)
    assert "head.weight" in decayed and any("attn" in n for n in decayed)
    assert any(p.dim() == 3 for p in decay["params"])  # the MoE expert weight stacks are matrices too
    assert all(not n.endswith("bias") for n in decayed)


@pytest.mark.parametrize("warmup,total", [(5, 40), (0, 40), (1, 40), (5, None), (10, 10)])
def test_schedule_is_linear_warmup_then_cosine_to_the_floor(warmup, total):
    def expected(step: int) -> float:  # the formula the schedule promises
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not total or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=3e-3)
    sched = warmup_cosine(opt, warmup, total, 0.1)
    for step in range(total or 30):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(3e-3 * expected(step), rel=1e-9), step
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------ signatures, options
def test_subclass_signature_merges_the_base_arguments_for_config_checks():
    sig = inspect.signature(ARPrior)
    assert {"dim", "positions", "codes", "tokenizer", "lr", "cond_drop_prob", "context_level"} <= set(sig.parameters)
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    check_params(ARPrior, {"dim": 8, "lr": 1e-3, "tokenizer": "t.ckpt"}, "model")
    with pytest.raises(ConfigError, match="Did you mean lr"):
        check_params(ARPrior, {"lrr": 1e-3}, "model")
    hp = _ar(lr=1e-3, dim=16).hparams
    assert hp["lr"] == 1e-3 and hp["dim"] == 16 and hp["code_spec"] == SYNTHETIC_SPEC


def test_declared_sampling_options_match_sample_and_build_flags():
    for cls in (ARPrior, MaskGITPrior):
        params = inspect.signature(cls.sample).parameters
        for opt in cls.sampling_options:
            assert opt.name in params and params[opt.name].default == opt.default, (cls, opt.name)
    with pytest.raises(TypeError, match="declared sampling options"):
        class Drifted(Prior):  # noqa: F841 - defining it is the test
            sampling_options = (SamplingOption("beam", int, 1, "beams"),)

            def sample(self, n: int, cond=None, generator=None) -> Tensor:
                raise NotImplementedError

    parser = argparse.ArgumentParser()
    add_sampling_flags(parser, MaskGITPrior.sampling_options)
    args = parser.parse_args(["--steps", "4", "--cfg", "1.5", "--cfg-ramp", "--top-k", "none"])
    assert sampling_kwargs(args, MaskGITPrior.sampling_options) == {"steps": 4, "cfg_scale": 1.5, "cfg_ramp": True}
    for bad in (["--steps", "0"], ["--cfg", "-1"], ["--top-p", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_sample_command_builds_its_flags_from_the_checkpoint_prior(tmp_path):
    from tokenforge.sampling_args import add_sampling_flags as command_flags

    ckpt = tmp_path / "mg.ckpt"
    torch.save({"tokenforge": {"kind": "prior", "target": "stage2.maskgit.MaskGITPrior"}, "state_dict": {}}, ckpt)
    assert sampling_options_of(ckpt) == MaskGITPrior.sampling_options
    assert sampling_options_of(tmp_path / "missing.ckpt") == ()
    parser = argparse.ArgumentParser()
    command_flags(parser, ["--seed", "3", str(ckpt)])
    assert parser.parse_args(["--steps", "3", "--no-cfg-ramp"]).steps == 3
    generic = argparse.ArgumentParser()
    command_flags(generic, [str(tmp_path / "missing.ckpt")])  # no prior named: the shared token options
    assert {a.dest for a in generic._actions} >= {o.name for o in TOKEN_SAMPLING}
    with pytest.raises(SystemExit):
        generic.parse_args(["--steps", "3"])


# ---------------------------------------------------------------------------- layouts and embedding
def test_code_layouts_flat_residual_continuous_and_hierarchical():
    residual = CodeLayout.from_spec({**SYNTHETIC_SPEC, "depth": 2})
    assert residual.shape == (3, 3, 2) and residual.seq_len == 18
    codes = torch.arange(36).view(2, 3, 3, 2) % 12
    flat = residual.flatten(codes)
    assert flat[0, :4].tolist() == [0, 1, 2, 3] and torch.equal(residual.unflatten(flat), codes)  # depth-minor
    cont = CodeLayout.from_spec({"grid": [2, 2], "depth": None, "codebook_size": None, "continuous": {"dim": 4}})
    assert cont.continuous and cont.shape == (2, 2, 4) and cont.flatten(torch.randn(3, 2, 2, 4)).shape == (3, 4, 4)
    emb = CodeEmbedding(cont, 8)
    assert isinstance(emb.tokens, torch.nn.Linear) and emb(torch.randn(3, 4, 4)).shape == (3, 4, 8)
    with pytest.raises(ConfigError, match="models discrete"):
        ARPrior(code_spec={"grid": [2, 2], "continuous": {"dim": 4}}, **TINY)
    hier = {"codebook_size": 12, "levels": {"top": {"grid": [2, 2]}, "bottom": {"grid": [4, 4], "codebook_size": 16}}}
    bottom = _ar(code_spec=hier, level="bottom", num_classes=None)
    assert bottom.code_shape == (4, 4) and bottom.codebook_size == 16
    with pytest.raises(ConfigError, match="level=NAME"):
        _ar(code_spec=hier)
    with pytest.raises(ConfigError, match="no conditioning code grid"):
        type("NoContext", (ContextProbe,), {"accepts_context": False})(
            code_spec=hier, level="bottom", context_level="top")


def test_depth_levels_are_embedded_per_position():
    layout = CodeLayout.from_spec({**SYNTHETIC_SPEC, "depth": 3})
    emb = CodeEmbedding(layout, 8)
    tokens = torch.zeros(1, 6, dtype=torch.long)
    out = emb(tokens) - emb.tokens(tokens)
    for i in range(6):
        torch.testing.assert_close(out[0, i], emb.levels.weight[i % 3])
    torch.testing.assert_close((emb(tokens[:, :2], offset=4) - emb.tokens(tokens[:, :2]))[0], emb.levels.weight[[1, 2]])


# -------------------------------------------------------------------------------------- conditioning
def test_label_dropout_uses_the_null_class_at_the_configured_rate():
    model = _ar(cond_drop_prob=0.3)
    labels = torch.randint(0, 3, (20000,))
    dropped = model.drop_labels(labels)
    null = dropped == model.null_class
    assert model.null_class == 3 and abs(null.float().mean().item() - 0.3) < 0.02
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(_ar(cond_drop_prob=0.0).drop_labels(labels), labels)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        _ar(cond_drop_prob=1.0)
    both, guided = model.guidance_labels(2, torch.tensor([0, 2]), cfg_scale=1.5)
    assert guided and both.tolist() == [0, 2, 3, 3]
    assert model.guidance_labels(2, None, cfg_scale=1.5)[0].tolist() == [3, 3]


class ContextProbe(Prior):
    """A minimal prior that records what the base hands to ``loss`` (the conditioning-grid hook)."""

    accepts_context = True

    def __init__(self, **prior):
        super().__init__(**prior)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[Tensor, Tensor | None]] = []

    def loss(self, codes, labels, context=None, generator=None) -> PriorLoss:
        self.seen.append((codes, context))
        return PriorLoss(self.weight * 0, self.weight.detach() * 0)

    def sample(self, n, cond=None, generator=None, context=None) -> Tensor:
        raise NotImplementedError


def test_conditioning_code_grid_reaches_loss_from_packed_and_mapped_codes():
    from data.codes import pack_levels

    spec = {"codebook_size": 8, "levels": {"top": {"grid": [2, 2]}, "bottom": {"grid": [4, 4]}}}
    model = ContextProbe(code_spec=spec, level="bottom", context_level="top", num_classes=None)
    assert model.context_layout().shape == (2, 2)
    levels = {"top": torch.randint(0, 8, (3, 2, 2)), "bottom": torch.randint(0, 8, (3, 4, 4))}
    model.training_step({"codes": levels}, 0)
    model.training_step({"codes": pack_levels(levels, spec)}, 0)  # as a code folder stores them
    for codes, context in model.seen:
        assert torch.equal(codes, levels["bottom"]) and torch.equal(context, levels["top"])


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_of_the_first_format_load_by_key_map(tmp_path):
    for model in (_ar(code_spec={**SYNTHETIC_SPEC, "depth": 2}), _ar(num_classes=None)):
        legacy = {}
        for key, value in model.state_dict().items():
            key = key.replace("embed.tokens.", "tok_emb.").replace("embed.levels.", "level_emb.")
            if model.num_classes is None and key == "classes.table.weight":
                key, value = "start", value.reshape(1, 1, -1)
            legacy[key.replace("classes.table.", "cls_emb.")] = value
        path = tmp_path / "v1.ckpt"
        meta = {"kind": "prior", "target": "stage2.ar.ARPrior", "format_version": 1}
        torch.save({"tokenforge": meta, "state_dict": legacy, "hyper_parameters": dict(model.hparams)}, path)
        loaded = load_prior(path)
        codes = torch.randint(0, 12, (2, *model.code_shape))
        with torch.no_grad():
            torch.testing.assert_close(loaded(codes)[0], model.eval()(codes)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------- frozen tokenizer route
def test_training_through_a_frozen_tokenizer_equals_training_on_its_code_files(tokenizer_and_codes):
    """Same data, same seed: a prior fed raw images through the frozen tokenizer takes exactly the
    steps of one fed the code files that tokenizer wrote."""
    from data.codes import CodeDataset
    from data.images import ImageDataModule

    ckpt, folder = tokenizer_and_codes
    on_data = _ar(code_spec=None, tokenizer=str(ckpt), num_classes=10, cond_drop_prob=0.5)
    on_codes = _ar(code_spec=None, codes=str(folder), num_classes=None, cond_drop_prob=0.5)  # manifest: 10
    assert on_codes.num_classes == 10 and on_data.code_spec == on_codes.code_spec
    assert on_data.tokenizer_path == str(ckpt)
    on_codes.load_state_dict(on_data.state_dict())  # the same initial weights
    images = ImageDataModule(dataset="fashion_mnist", size=28, batch_size=16, limit_train=256, limit_val=64)
    images.setup("fit")
    code_items = CodeDataset(folder, "train")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (on_data, on_codes)]
    for step, batch in enumerate(images.split_dataloader("train")):
        if step == 4:
            break
        idx = list(range(step * 16, step * 16 + 16))
        code_batch = code_items.__getitems__(idx)
        assert torch.equal(on_data.unpack_batch(batch)[0], code_batch["codes"])  # encoded on the fly
        losses = []
        for model, opt, b in zip((on_data, on_codes), opts, (batch, code_batch)):
            torch.manual_seed(step)  # the same label-dropout draws
            opt.zero_grad()
            loss = model.training_step(b, step)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(on_data.state_dict().items(), on_codes.state_dict().values()):
        assert torch.equal(a, b), name
    tok = on_data.frozen_tokenizer
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert not any(k.startswith("_frozen") for k in on_data.state_dict())  # the tokenizer is not saved
