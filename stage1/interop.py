"""Tokenizers trained elsewhere, loaded into ours by key map: diffusers ``VQModel`` folders and
taming-transformers VQGAN checkpoints.

Both libraries share one autoencoder architecture (diffusers' ``Encoder``/``Decoder`` are the LDM
port of taming's), which :mod:`stage1.diffusers_blocks` wraps behind our network contract. A
loaded model is our :class:`~stage1.vqgan.VQGAN` with diffusers' blocks, our
:class:`~stage1.quantizers.vq.VectorQuantizer` (gradient codebook, the foreign codebook copied in)
and a fresh discriminator (for fine-tuning); encode codes and decoded images equal the source
library's. Nothing is unpickled: diffusers weights come through ``safetensors`` (or
``torch.load(weights_only=True)`` for ``.bin``), taming checkpoints through
``torch.load(weights_only=True)``, configs through JSON / OmegaConf YAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stage1.vqgan import VQGAN


class ForeignCheckpointError(ValueError):
    """A foreign checkpoint or config cannot be mapped onto our tokenizer (names what and how to fix)."""


# ----------------------------------------------------------------------------------- diffusers
def _attn_levels(block_types: list[str], reverse: bool) -> list[int]:
    types = block_types[::-1] if reverse else block_types
    return [i for i, t in enumerate(types) if t.startswith("Attn")]


def params_from_diffusers_config(config: Mapping[str, Any], resolution: int | None = None) -> dict[str, Any]:
    """Our VQGAN constructor arguments for a diffusers ``VQModel`` ``config.json``."""
    for key in ("block_out_channels", "latent_channels", "num_vq_embeddings"):
        if key not in config:
            raise ForeignCheckpointError(f"diffusers config has no {key!r}: is this a VQModel config.json?")
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"]))
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    if set(down + up) - known:
        raise ForeignCheckpointError(f"unsupported diffusers block types {sorted(set(down + up) - known)}; "
                                     f"supported: {sorted(known)}")
    latent = int(config["latent_channels"])
    embed_dim = int(config.get("vq_embed_dim") or latent)
    norm_type = config.get("norm_type", "group")
    if norm_type == "spatial" and embed_dim != latent:
        raise ForeignCheckpointError("spatial-norm VQModel with vq_embed_dim != latent_channels is not supported")
    common = {
        "z_channels": latent,
        "block_out_channels": [int(c) for c in config["block_out_channels"]],
        "layers_per_block": int(config.get("layers_per_block", 1)),
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "mid_attention": bool(config.get("mid_block_add_attention", True)),
    }
    size = resolution or config.get("sample_size") or 256
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return {
        "encoder": {"target": "stage1.diffusers_blocks.DiffusersEncoder",
                    "params": {**common, "in_channels": int(config.get("in_channels", 3)),
                               "attn_levels": _attn_levels(down, reverse=False)}},
        "decoder": {"target": "stage1.diffusers_blocks.DiffusersDecoder",
                    "params": {**common, "out_channels": int(config.get("out_channels", 3)), "norm_type": norm_type,
                               "attn_levels": _attn_levels(up, reverse=True)}},
        "quantizer": {"target": "stage1.quantizers.vq.VectorQuantizer",
                      "params": {"codebook_size": int(config["num_vq_embeddings"]), "codebook": "gradient",
                                 "beta": 0.25}},
        "embed_dim": embed_dim,
        "resolution": size,
    }


def _our_key(key: str) -> str:
    """A diffusers ``VQModel`` state-dict key -> ours."""
    if key == "quantize.embedding.weight":
        return "quantizer.embed"
    for part in ("encoder.", "decoder."):
        if key.startswith(part):
            return part + "net." + key[len(part):]
    return key


def _read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for f in safetensors:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ForeignCheckpointError(f"{folder} has no *.safetensors or *.bin weights next to config.json")


def load_diffusers_vqmodel(folder: str | Path, resolution: int | None = None) -> VQGAN:
    """Our VQGAN from a diffusers ``VQModel`` folder (``config.json`` + weights), in eval mode.

    Kandinsky's MoVQ (``norm_type: spatial``) and aMUSEd's VQGAN are in this format; pass the
    folder that holds ``config.json`` (e.g. the ``movq`` or ``vqvae`` subfolder of a pipeline).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ForeignCheckpointError(f"{config_path} not found: pass the folder holding a diffusers VQModel's "
                                     "config.json and weights (e.g. <pipeline>/movq)")
    config = json.loads(config_path.read_text())
    model = VQGAN(**params_from_diffusers_config(config, resolution))
    state = {_our_key(k): v for k, v in _read_diffusers_weights(folder).items()}
    return _load_mapped(model, state, source=str(folder))


# -------------------------------------------------------------------------------------- taming
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _taming_to_diffusers_key(key: str, levels: int) -> str | None:
    """One taming ``VQModel`` key -> the diffusers ``VQModel`` key (None: not part of the tokenizer)."""
    if key.startswith("loss.") or key.startswith("discriminator."):
        return None
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"^(encoder|decoder)\.mid\.block_([12])\.(.*)$",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"),
        (r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$",
         lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{m[3]}"),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"),
        (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(.*)$",
         lambda m: f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.{_ATTN_PARTS[m[3]]}.{m[4]}"),
        (r"^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$",
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        # taming indexes decoder levels by resolution (0 = full); diffusers from the lowest up.
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."
                   f"{m[3].replace('nin_shortcut', 'conv_shortcut')}"),
        (r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(.*)$",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.attentions.{m[2]}.{_ATTN_PARTS[m[3]]}.{m[4]}"),
        (r"^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"^(encoder|decoder)\.norm_out\.(.*)$", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
    ]
    for pattern, build in rules:
        match = re.match(pattern, key)
        if match:
            return build(match)
    return key  # conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding keep their names


def taming_state_dict_to_diffusers(state: Mapping[str, Tensor], levels: int) -> dict[str, Tensor]:
    """Rename a taming VQGAN ``state_dict`` to diffusers ``VQModel`` keys; 1x1-conv attention
    projections become the linear weights diffusers uses; the GAN loss' weights are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _taming_to_diffusers_key(key, levels)
        if new is None:
            continue
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def params_from_taming_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our VQGAN constructor arguments for a taming VQGAN config (its ``model.params`` section or the
    whole YAML)."""
    params = config.get("model", {}).get("params", config) if "model" in config else config
    dd = params.get("ddconfig")
    if dd is None or "n_embed" not in params or "embed_dim" not in params:
        raise ForeignCheckpointError("taming config needs model.params.ddconfig, n_embed and embed_dim "
                                     "(the YAML that came with the checkpoint, e.g. configs/*-project.yaml)")
    if dd.get("double_z", False):
        raise ForeignCheckpointError("ddconfig.double_z=True is a KL autoencoder, not a VQGAN")
    mult = [int(m) for m in dd["ch_mult"]]
    resolution = int(dd["resolution"])
    attn_res = {int(r) for r in dd.get("attn_resolutions", [])}
    attn_levels = [i for i in range(len(mult)) if resolution // 2**i in attn_res]
    common = {"z_channels": int(dd["z_channels"]), "block_out_channels": [int(dd["ch"]) * m for m in mult],
              "layers_per_block": int(dd["num_res_blocks"]), "norm_num_groups": 32, "mid_attention": True,
              "attn_levels": attn_levels}
    return {
        "encoder": {"target": "stage1.diffusers_blocks.DiffusersEncoder",
                    "params": {**common, "in_channels": int(dd.get("in_channels", 3))}},
        "decoder": {"target": "stage1.diffusers_blocks.DiffusersDecoder",
                    "params": {**common, "out_channels": int(dd.get("out_ch", 3))}},
        "quantizer": {"target": "stage1.quantizers.vq.VectorQuantizer",
                      "params": {"codebook_size": int(params["n_embed"]), "codebook": "gradient", "beta": 0.25}},
        "embed_dim": int(params["embed_dim"]),
        "resolution": resolution,
    }


def load_taming_vqgan(checkpoint: str | Path, config: str | Path) -> VQGAN:
    """Our VQGAN from a taming-transformers VQGAN checkpoint (``state_dict``) and its config YAML."""
    from omegaconf import OmegaConf

    checkpoint, config = Path(checkpoint), Path(config)
    for path in (checkpoint, config):
        if not path.is_file():
            raise ForeignCheckpointError(f"{path} not found")
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    params = params_from_taming_config(cfg)
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for objects beyond tensors; zip/EOF errors for broken files
        raise ForeignCheckpointError(
            f"{checkpoint} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). If you trust its origin, re-save only its "
            "tensors once: torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, new_path)"
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ForeignCheckpointError(f"{checkpoint} holds no state_dict")
    levels = len(params["encoder"]["params"]["block_out_channels"])
    mapped = {_our_key(k): v for k, v in taming_state_dict_to_diffusers(state, levels).items()}
    return _load_mapped(VQGAN(**params), mapped, source=str(checkpoint))


# ------------------------------------------------------------------------------------- shared
def _load_mapped(model: VQGAN, state: dict[str, Tensor], source: str) -> VQGAN:
    """Copy mapped tensors into the tokenizer, checking names and shapes; the discriminator and the
    quantizer's running statistics keep their fresh values."""
    own = model.state_dict()
    tokenizer_keys = {k for k in own if not k.startswith("discriminator.")
                      and k not in ("quantizer.cluster_size", "quantizer.initialized")}
    missing = sorted(tokenizer_keys - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape mismatch", wrong)) if keys)
        raise ForeignCheckpointError(f"{source} does not match the architecture its config describes ({detail})")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(own)
    return model.eval()
