"""Per-sample clipping in one backward pass: ghost norms plus book-keeping.

Opacus' hooks materialize every example's gradient (``B x d_out x d_in`` per linear layer); its
ghost clipping avoids that but needs the per-example losses and a second backward pass, which a
``training_step`` that returns one reduced loss cannot give. This engine needs neither:

* during the ordinary backward pass it keeps, per layer, the input activations ``a`` and the
  output gradients ``b`` (book-keeping, Bu et al. 2023);
* the per-example gradient norm of a linear layer is computed without the gradient ("ghost norm",
  Li et al. 2022): ``||b_i^T a_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``, or from the
  materialized ``b_i^T a_i`` when that is cheaper (short sequences); embeddings use
  ``sum_{t,s} [id_it = id_is] (b_it . b_is)``, layer norms their small per-example gradients;
* autograd does not compute the weight gradients of linear layers whose input carries the gradient
  (the parameters leave the graph for the call), since book-keeping computes them, clipped;
* with the clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula), the clipped sum is
  one matrix product per layer, ``sum_i c_i b_i^T a_i = (c * b)^T a``, the size of the ordinary
  weight gradient; it is stored in ``p.summed_grad`` where Opacus' ``DPOptimizer`` adds the noise.

The examples of a layer's input are along the dimension :func:`lightning_shrink.privacy.layers.batch_dim`
gives (time-major ``(T, B, D)`` inputs with ``batch_first=False``); every step, each layer must
have seen exactly as many examples as the batch holds, else the step is refused naming the layer.
For a layer fake-quantized by quantization-aware training, ``a`` is its fake-quantized input (the
straight-through gradient passes the rounding unchanged).

The result is the same DP-SGD step as Opacus' (same clipping rule, same noise, same sampling), so
the same accountant applies; the tests check it against Opacus' hooks and a ``torch.func``
reference. Supported trainable layers: ``nn.Linear``, ``nn.Embedding`` (without ``max_norm``, not
sparse), their fake-quantized forms, and ``nn.LayerNorm``, each parameter used by one layer call per
step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_shrink.privacy.errors import PrivacyError, batch_mismatch_message, no_backward_message
from lightning_shrink.privacy.layers import (
    batch_dim,
    is_fake_quantized,
    trainable_direct,
    uncovered_parameters,
    weight_input,
)

__all__ = ["SUPPORTED_LAYERS", "GhostClippingEngine", "unsupported_layers"]

#: Layer types whose per-example gradient norms and clipped sums this engine computes.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.LayerNorm)

_PREFIX = "DifferentialPrivacy(grad_sample_mode='ghost')"


def _supported(module: nn.Module) -> bool:
    if type(module) in SUPPORTED_LAYERS:
        kind: type | None = type(module)
    elif is_fake_quantized(module) and isinstance(module, (nn.Linear, nn.Embedding)):
        kind = nn.Linear if isinstance(module, nn.Linear) else nn.Embedding
    else:
        kind = None
    if kind is nn.Embedding and (module.max_norm is not None or module.sparse):
        return False
    return kind is not None and not uncovered_parameters(module)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (and types) of the trainable layers this engine cannot clip, and of shared parameters."""
    bad = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        params = trainable_direct(module)
        if not params:
            continue
        if not _supported(module):
            extra = uncovered_parameters(module)
            detail = f", parameters {extra} beyond weight and bias" if extra else ""
            bad.append(f"{name or '<root>'} ({type(module).__name__}{detail})")
        for p in params:
            if id(p) in owner:
                bad.append(f"{name} (parameter shared with {owner[id(p)]})")
            owner[id(p)] = name
    return bad


class GhostClippingEngine:
    """Attaches to the trainable layers of ``model``; see the module's documentation.

    Args:
        model: The model whose trainable layers are all supported (:func:`unsupported_layers`).
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the batch's examples.
        skip_weight_grads: Let autograd skip the weight gradients of linear layers (book-keeping
            computes them); ``False`` under DDP, whose reducer waits for every gradient.
        batch_first: Whether layer inputs have their examples first (see
            :func:`lightning_shrink.privacy.layers.batch_dim`).
    """

    name = "ghost"

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        skip_weight_grads: bool = True,
        batch_first: bool = True,
    ) -> None:
        self.loss_reduction = loss_reduction
        self.skip_weight_grads = skip_weight_grads
        self.batch_first = batch_first
        self.layers = {m: name for name, m in model.named_modules() if trainable_direct(m)}
        self.acts: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
        self.grads: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.layers]
        if skip_weight_grads:
            self._handles += [
                m.register_forward_pre_hook(self._detach_weights)
                for m in self.layers
                if isinstance(m, nn.Linear)
            ]
        self._detached: dict[nn.Module, list[nn.Parameter]] = {}

    # ------------------------------------------------------------------ capture

    def _detach_weights(self, module: nn.Module, args: tuple) -> None:
        # Book-keeping computes the (clipped) weight gradients itself: when the layer's input carries
        # the gradient on, autograd need not compute them a second time. The parameters leave the
        # graph for this call only; ``requires_grad`` is restored right after the forward.
        # Gated on autograd only, not on ``module.training``: Lightning does not switch a pretrained
        # model out of eval mode, and its gradients still need clipping.
        if not torch.is_grad_enabled() or not args:
            return
        if not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return
        params = trainable_direct(module)
        for p in params:
            p.requires_grad_(False)
        self._detached[module] = params

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        for p in self._detached.pop(module, ()):
            p.requires_grad_(True)
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            return
        self.acts[module].append(weight_input(module, args[0]).detach())
        grads = self.grads[module]
        output.register_hook(lambda g: grads.append(g.detach()))

    def has_data(self) -> bool:
        """Whether a backward pass reached a layer since the last :meth:`reset`."""
        return any(self.grads.values())

    def reset(self) -> None:
        """Forget the recorded activations and gradients."""
        self.acts.clear()
        self.grads.clear()

    def close(self) -> None:
        """Remove every hook; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for params in self._detached.values():
            for p in params:
                p.requires_grad_(True)
        self._detached.clear()
        self.reset()

    # ------------------------------------------------------------------ clipping

    def _pairs(
        self, params_of: dict[int, Any], examples: int
    ) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        pairs = []
        for module, name in self.layers.items():
            if not any(id(p) in params_of for p in trainable_direct(module)):
                continue
            acts, grads = self.acts.get(module, []), self.grads.get(module, [])
            if len(acts) != 1 or len(grads) != 1:
                raise PrivacyError(
                    f"{_PREFIX}: layer {name!r} ({type(module).__name__}) ran {len(acts)} forward and "
                    f"{len(grads)} backward pass(es) in this step (one of each is needed; a layer called "
                    "twice or not at all cannot be clipped here): use grad_sample_mode='hooks'"
                )
            a, b = acts[0], grads[0]
            dim = batch_dim(module, a, self.batch_first)
            if a.dim() <= dim or a.shape[dim] != examples or b.shape[dim] != examples:
                raise PrivacyError(
                    batch_mismatch_message(
                        "ghost", name, module, tuple(a.shape), dim, examples, self.batch_first
                    )
                )
            a, b = a.movedim(dim, 0), b.movedim(dim, 0)
            if self.loss_reduction == "mean":
                b = b * examples  # gradient of the example's own loss, as Opacus' hooks do
            pairs.append((module, a, b))
        return pairs

    @torch.no_grad()
    def clip_and_accumulate(
        self, optimizer: Any, examples: int | None = None, discard: bool = False
    ) -> torch.Tensor:
        """Compute per-example norms, clip, and store the clipped sums in ``p.summed_grad``.

        Args:
            optimizer: The Opacus ``DPOptimizer`` (its ``params`` and ``max_grad_norm``).
            examples: The number of examples in the batch; ``None`` takes it from the first layer's
                batch dimension (for a model known to be batch-first, as in the benchmarks).
            discard: The batch is the stand-in for an empty Poisson batch: check it, then store zero
                sums (the step is noise only).

        Returns the per-example gradient norms before clipping (empty when the sums are zero).

        Raises:
            PrivacyError: a layer saw a different number of examples than the batch holds, ran more
                or less than once, or no layer recorded anything although the batch has examples.
        """
        params_of = {id(p): p for p in optimizer.params}
        if examples is None:
            first = next((m for m in self.layers if self.acts.get(m)), None)
            if first is None:
                raise PrivacyError(f"{_PREFIX}: no layer recorded activations in this step")
            examples = self.acts[first][0].shape[batch_dim(first, self.acts[first][0], self.batch_first)]
        if not self.has_data():
            if examples and not discard:
                raise PrivacyError(no_backward_message(examples))
            pairs = []
        else:
            pairs = self._pairs(params_of, examples)
        if examples == 0 or discard:
            for p in optimizer.params:
                p.summed_grad = torch.zeros_like(p)
            self.reset()
            return torch.zeros(0)
        device = pairs[0][2].device
        sq = torch.zeros(examples, dtype=torch.float32, device=device)
        for module, a, b in pairs:
            sq += self._norm_sq(module, a, b)
        norms = sq.sqrt()
        clip = (optimizer.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for module, a, b in pairs:
            for p, grad in self._clipped_sums(module, a, b, clip):
                if id(p) not in params_of:
                    continue
                grad = grad.to(p.dtype)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        self.reset()
        return norms

    @staticmethod
    def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = b.shape[0]
        return a.reshape(batch, -1, a.shape[-1]).float(), b.reshape(batch, -1, b.shape[-1]).float()

    def _norm_sq(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Linear):
            a3, b3 = self._flat(a, b)
            t, d_in, d_out = a3.shape[1], a3.shape[2], b3.shape[2]
            total = torch.zeros(b3.shape[0], device=b3.device)
            if module.weight.requires_grad:
                if t == 1:
                    total += a3.square().sum((1, 2)) * b3.square().sum((1, 2))
                elif t * t * (d_in + d_out) < t * d_in * d_out:
                    aa = torch.bmm(a3, a3.transpose(1, 2))
                    bb = torch.bmm(b3, b3.transpose(1, 2))
                    total += (aa * bb).sum((1, 2))
                else:
                    total += torch.bmm(b3.transpose(1, 2), a3).square().sum((1, 2))
            if module.bias is not None and module.bias.requires_grad:
                total += b3.sum(1).square().sum(1)
            return total
        if isinstance(module, nn.Embedding):
            ids = a.reshape(b.shape[0], -1)
            b3 = b.reshape(b.shape[0], -1, b.shape[-1]).float()
            if module.padding_idx is not None:
                b3 = b3 * (ids != module.padding_idx).unsqueeze(-1)
            same = ids.unsqueeze(2) == ids.unsqueeze(1)
            bb = torch.bmm(b3, b3.transpose(1, 2))
            return (bb * same).sum((1, 2))
        if isinstance(module, nn.LayerNorm):
            gw, gb = self._layer_norm_per_sample(module, a, b)
            total = torch.zeros(b.shape[0], device=b.device)
            if gw is not None:
                total += gw.square().reshape(b.shape[0], -1).sum(1)
            if gb is not None:
                total += gb.square().reshape(b.shape[0], -1).sum(1)
            return total
        raise TypeError(f"unsupported layer {type(module).__name__}")

    @staticmethod
    def _layer_norm_per_sample(
        module: nn.LayerNorm, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        dims = len(module.normalized_shape)
        batch = b.shape[0]
        reduce = tuple(range(1, b.dim() - dims))
        gw = gb = None
        if module.weight is not None and module.weight.requires_grad:
            x_hat = F.layer_norm(a.float(), module.normalized_shape, None, None, module.eps)
            gw = (x_hat * b.float()).sum(reduce) if reduce else x_hat * b.float()
            gw = gw.reshape(batch, *module.normalized_shape)
        if module.bias is not None and module.bias.requires_grad:
            gb = b.float().sum(reduce) if reduce else b.float()
            gb = gb.reshape(batch, *module.normalized_shape)
        return gw, gb

    def _clipped_sums(
        self, module: nn.Module, a: torch.Tensor, b: torch.Tensor, clip: torch.Tensor
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if isinstance(module, nn.Linear):
            a3, b3 = self._flat(a, b)
            bc = b3 * clip.view(-1, 1, 1)
            if module.weight.requires_grad:
                out.append((module.weight, bc.reshape(-1, bc.shape[-1]).t() @ a3.reshape(-1, a3.shape[-1])))
            if module.bias is not None and module.bias.requires_grad:
                out.append((module.bias, bc.sum((0, 1))))
        elif isinstance(module, nn.Embedding):
            ids = a.reshape(-1)
            bc = (b.float() * clip.view(-1, *([1] * (b.dim() - 1)))).reshape(-1, b.shape[-1])
            if module.padding_idx is not None:
                bc = bc * (ids != module.padding_idx).unsqueeze(-1)
            grad = torch.zeros(module.num_embeddings, module.embedding_dim, device=bc.device)
            grad.index_add_(0, ids, bc)
            out.append((module.weight, grad))
        elif isinstance(module, nn.LayerNorm):
            gw, gb = self._layer_norm_per_sample(module, a, b)
            if gw is not None:
                out.append((module.weight, torch.einsum("b,b...->...", clip, gw)))
            if gb is not None:
                out.append((module.bias, torch.einsum("b,b...->...", clip, gb)))
        return out
