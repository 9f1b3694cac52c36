"""StableMoE (Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of Experts"):
learn a routing, distil it into a lightweight router, then freeze that router.

Stage 1 (the first ``stage1_steps`` training forwards): token t goes to expert
``a_t = argmax_e s_te``, ``s_te = x_t . c_e`` with trainable expert centroids ``c``, and the output
is ``sigmoid(s_{t,a_t}) FFN_{a_t}(x_t)`` (top-1; the block adds the residual). Two losses:

* balance ``sum_e (|A_e| - n/E) / (n/E) * sum_{t in A_e} sigmoid(s_te)`` (A_e: tokens sent to e),
  which pushes the scores of overloaded experts down and of idle ones up;
* distillation ``CE(softmax(r_t . d), a_t)``: a lightweight router with its own centroids ``d``
  learns to predict the stage-1 assignment.

Stage 2: the lightweight router is frozen and decides ``a_t`` alone (no balance or distillation
loss); the gate ``sigmoid(x_t . c_{a_t})`` keeps training. Evaluation always routes with the
lightweight router, as the authors' code does, so a model is evaluated with the routing it will keep.

Two adaptations to this repository, named here: (1) the paper's lightweight router reads the
*word embedding* of the token (its id); an FFN slot only sees hidden states, so ours reads the
detached input through a ``distill_dim`` projection (gradients from distillation never reach the
backbone, as in the paper, but the input still moves while the backbone trains in stage 1).
(2) fairseq sums both losses over tokens and divides gradients by the token count; with the
mean-reduced task losses used here, both are divided by the number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Routing
from .router_losses import entropy, load_fraction
from .routers import Router


class StableMoERouter(Router):
    """Two-stage StableMoE routing (top-1); :meth:`freeze` moves to stage 2 at once."""

    def __init__(self, dim: int, num_experts: int, stage1_steps: int = 1000, distill_dim: int = 50,
                 balance_weight: float = 1.0, distill_weight: float = 1.0) -> None:
        super().__init__(dim, num_experts)
        self.stage1_steps, self.balance_weight, self.distill_weight = stage1_steps, balance_weight, distill_weight
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.orthogonal_(self.centroids, gain=0.1)  # the authors' initialisation
        self.distill_in = nn.Linear(dim, distill_dim, bias=False)
        self.distill_centroids = nn.Parameter(torch.empty(num_experts, distill_dim))
        nn.init.orthogonal_(self.distill_centroids, gain=0.1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def stage(self) -> int:
        return 2 if bool(self.frozen) else 1

    def freeze(self) -> None:
        """Enter stage 2: the lightweight router stops learning and decides the routing."""
        self.frozen.fill_(True)
        for p in (*self.distill_in.parameters(), self.distill_centroids):
            p.requires_grad_(False)

    def distilled_logits(self, x: Tensor) -> Tensor:
        """The lightweight router's scores ``r_t . d_e`` for flattened tokens (N, E)."""
        return self.distill_in(x.detach().float()) @ self.distill_centroids.float().t()

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.stage == 1 and int(self.steps) >= self.stage1_steps:
            self.freeze()
        if self.frozen and any(p.requires_grad for p in self.distill_in.parameters()):
            self.freeze()  # restored from a stage-2 checkpoint
        xf = x.reshape(-1, self.dim).float()
        n = xf.shape[0]
        scores = xf @ self.centroids.float().t()  # s_te, differentiable (gate and balance loss)
        learning = self.training and self.stage == 1
        if learning:
            expert = scores.detach().argmax(-1)
        else:
            with torch.no_grad():
                expert = self.distilled_logits(xf).argmax(-1)
        gate = torch.sigmoid(scores.gather(-1, expert[:, None]).squeeze(-1))
        load = load_fraction(expert, self.num_experts)
        loss, stats = self._zero(x), {}
        if learning:
            per_expert = load * n  # |A_e|
            mean_load = n / self.num_experts
            bal = ((per_expert - mean_load) / mean_load * torch.zeros_like(per_expert).index_add(
                0, expert, gate)).sum() / n
            distilled = self.distilled_logits(xf)
            dis = F.cross_entropy(distilled, expert)
            loss = self.balance_weight * bal + self.distill_weight * dis
            agree = (distilled.detach().argmax(-1) == expert).float().mean()
            stats = {"balance_loss": bal.detach(), "distill_loss": dis.detach(), "distill_agreement": agree}
            self.steps += 1
        stats["stage"] = torch.tensor(float(self.stage))
        token_idx = torch.arange(n, device=x.device)
        return Routing(token_idx, expert, gate, loss, load, entropy(scores.detach().softmax(-1)), stats,
                       k_per_token=1)
