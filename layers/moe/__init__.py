"""Mixture-of-Experts layers: a drop-in FFN (:class:`MoE`), its conv wrapper (:class:`ConvMoE`), and
routers chosen in YAML, e.g.
``ffn: {target: layers.moe.MoE, params: {num_experts: 8, top_k: 2, hidden_dim: 1024,
router: {target: layers.moe.TopKRouter, params: {balance_weight: 0.01}}}}``.

Files: ``contract.py`` (the router -> layer contract, :class:`Routing`), ``router_losses.py``
(losses and statistics routers share), ``routers.py`` (sparse routers), ``top_any.py`` (DynMoE),
``soft.py`` (Soft MoE), ``experts.py`` (stacked experts, grouped matmul), ``layer.py`` (dispatch,
MoE, ConvMoE), ``deepseek.py`` (fine-grained + shared experts), ``upcycle.py`` (dense FFN -> MoE),
``multi_head.py`` (MH-MoE), ``peer.py`` (PEER product-key experts),
``sparsemixer.py`` (GRIN's SparseMixer-v2 router),
``stable.py`` (StableMoE's two-stage routing), ``attention_heads.py`` (MoA: experts in attention),
``merge.py`` (MC-SMoE expert merging after training), ``recording.py`` (what the routers decided, for
``evaluate``'s routing plots).
"""

from .attention_heads import MixtureOfAttentionHeads
from .contract import Routing
from .deepseek import DeepSeekMoE
from .experts import StackedExperts
from .layer import ConvMoE, MoE, SharedExperts, build_router
from .merge import group_experts, merge_groups
from .multi_head import MultiHeadMoE
from .peer import PEER
from .recording import RoutingRecorder, mutual_information_bits
from .router_losses import balance_loss, z_loss
from .routers import (
    AuxFreeRouter,
    ExpertChoiceRouter,
    MoEPlusPlusRouter,
    ReLURouter,
    Router,
    TopKRouter,
    link_gating_residuals,
)
from .soft import SoftMoERouter
from .sparsemixer import SparseMixerRouter
from .stable import StableMoERouter
from .top_any import TopAnyRouter
from .upcycle import upcycle_ffn, upcycle_transformer

__all__ = [
    "AuxFreeRouter", "ConvMoE", "DeepSeekMoE", "ExpertChoiceRouter", "MixtureOfAttentionHeads", "MoE",
    "MoEPlusPlusRouter", "MultiHeadMoE", "PEER", "ReLURouter", "Router", "Routing", "RoutingRecorder",
    "SharedExperts",
    "SoftMoERouter", "SparseMixerRouter", "StableMoERouter", "StackedExperts", "TopAnyRouter", "TopKRouter",
    "balance_loss", "build_router", "group_experts", "link_gating_residuals", "merge_groups", "upcycle_ffn",
    "mutual_information_bits", "upcycle_transformer", "z_loss",
]
