"""Hedgehog: a learned exponential feature map distilled to mimic softmax attention (a learned baseline).

Zhang, Bhatia, Kumbong, Re, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry", ICLR 2024 (arXiv 2402.04347), Sec. 4.1: a trainable linear layer z = W x + b
(W ``[m, d]``, b ``[m]``, one per head) followed by the exponential with negation,

    phi(x) = [exp(z), exp(-z)] / Z(x),    Z(x) = sum_i exp(z_i) + exp(-z_i),

i.e. a softmax over the 2m features of each token, queries and keys alike, as the authors' code
(and fla's ``HedgehogFeatureMap``) computes it. The linear attention weights are then
a^_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j'), and W, b are trained to minimise the
cross-entropy -sum_j a_ij log a^_ij against the softmax weights a_ij (the paper's attention
distillation loss; ``rfbench.learning`` objective ``"crossentropy"``). Z(q) cancels in a query's
attention row; Z(k) does not: the per-key softmax is part of the map, not a stabiliser.

Not an estimator of exp(q . k): the map is deterministic once trained (no Monte Carlo variance
over seeds beyond that of the random initialisation) and biased; phi(q) . phi(k) lies in (0, 1]
and has no kernel scale, so the kernel metrics against exp(q . k) say little, and what it is
measured by is the attention matrix and output error (``attn_mse``, ``out_rel_err``). Its declared
target has no closed form (``HEDGEHOG_TARGET``).

Initialisation: W0 = w / r, b0 = 0, with w the weight matrix's Gaussian draw (rows N(0, I), so the
seed sets the init) and r the root mean square norm of the scaled fit tokens (queries and keys
pooled, per leading index): the initial logits z_i have unit variance over the data. The paper's
d -> d layer starts from the identity; a random init serves any m. Training (``rfbench.learning``)
moves W, b from the draw into ``params_``; the draw is never redrawn while training
(``learns_draw``). ``feature_dim`` is 2m, as for every +/- map.
"""

from __future__ import annotations

import math

import torch

from rfbench.errors import EstimatorError
from rfbench.features.base import FeatureMap, Params, sq_norm
from rfbench.features.target import TargetKernel
from rfbench.weights.base import WeightDraw

HEDGEHOG_TARGET = "learned: Hedgehog attention weights (no kernel scale)"


class Hedgehog(FeatureMap):
    """phi(x) = softmax([W x + b, -(W x + b)]) over the 2m features (Hedgehog, Zhang et al., ICLR
    2024, Sec. 4.1), W and b trained by ``rfbench.learning``; biased, deterministic once trained.

    Parameters (keyword): init_scale (1.0): the initial logits' standard deviation over the data.
    """

    name = "hedgehog"
    per_omega = 2
    unbiased = False
    data_dependent = True
    #: W, b are trainable tensors (read by rfbench.learning); they start from the draw.
    learnable = True
    learns_draw = True
    weights = ("iid",)  # the draw is the (Gaussian) initialisation of W
    target = HEDGEHOG_TARGET
    description = "Hedgehog learned softmax-mimicking map softmax([Wx+b, -(Wx+b)]); biased, trained"
    reference = "Zhang et al., The Hedgehog & the Porcupine, ICLR 2024 (arXiv 2402.04347), Sec. 4.1"
    defaults = {"init_scale": 1.0}

    def _validate(self) -> None:
        s = self.params["init_scale"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise EstimatorError(f"hedgehog: init_scale must be a positive number, got {s!r}")

    def fit_params(self, q: torch.Tensor, k: torch.Tensor) -> Params:
        """``{"rms": [..., 1, 1]}``: the RMS norm of the pooled scaled queries and keys (the init's scale)."""
        ms = torch.cat([sq_norm(q), sq_norm(k)], dim=-2).mean(dim=-2, keepdim=True)
        if not bool((ms > 0).all()):
            raise EstimatorError("hedgehog: the fit tokens are all zero; its init needs nonzero q, k")
        return {"rms": ms.sqrt()}

    # ------------------------------------------------------------------ learnable protocol
    def layer(self, params: Params, draw: WeightDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [..., m, d], b [..., m])``: the trained layer, else the initial one from the draw."""
        if "W" in params:
            return params["W"], params["b"]
        if "rms" not in params:
            raise EstimatorError("hedgehog has data-dependent parameters: call est.fit(q, k) first")
        W = draw.W * (self.params["init_scale"] / params["rms"].to(draw.W))
        return W, torch.zeros(W.shape[:-1], dtype=W.dtype, device=W.device)

    def learnable_params(self, params: Params, draw: WeightDraw) -> Params:
        """The tensors ``rfbench.learning`` trains: W and b, starting at the initial layer."""
        W, b = self.layer(params, draw)
        return {"W": W, "b": b}

    def trained_target(self, params: Params) -> TargetKernel:
        return TargetKernel(HEDGEHOG_TARGET, None)

    def target_kernel(self, params: Params) -> TargetKernel:
        """No kernel of closed form: the map approximates attention weights only."""
        return TargetKernel(HEDGEHOG_TARGET, None)

    # ------------------------------------------------------------------ features
    def log_features(self, x: torch.Tensor, draw: WeightDraw, params: Params, is_query: bool):
        """``(log phi, None)``, ``[..., L, 2m]``, with +log(m)/2 undoing the Estimator's 1/sqrt(m) per side
        (so ``kernel()`` is phi(q) . phi(k) itself). log_softmax is exact in log space: no overflow."""
        W, b = self.layer(params, draw)
        W, b = W.to(x.dtype), b.to(x.dtype)
        z = x @ W.transpose(-1, -2) + b.unsqueeze(-2)
        log_phi = torch.log_softmax(torch.cat([z, -z], dim=-1), dim=-1)
        return log_phi + 0.5 * math.log(W.shape[-2]), None
