"""What a mixture-of-experts policy's routers did during an update: each expert's share of the
routed tokens per layer (a forward hook on every router, counting only forwards that build a
graph, i.e. the training passes) and megatron's load-balancing loss (its aux-loss tracker, filled
only when the loss's coefficient is above 0). Shares count the prompt and response tokens of the
training micro-batches (``known(layer)``: which of a forward's positions are tokens, not padding);
1 / num_experts each is perfect balance, a share near 0 for some expert and far above
1 / num_experts for another is routing collapse."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.builder import model_chunks, unwrap


class RoutingStats:
    def __init__(self, model, device, known=None):
        from megatron.core.transformer.moe.router import TopKRouter

        gpt = unwrap(model)
        self.experts = gpt.config.num_moe_experts
        self.layers = gpt.config.num_layers
        self.counts = torch.zeros(self.layers, self.experts, dtype=torch.float64, device=device)
        self.known = known or (lambda index: None)
        self.handles = []
        for chunk in model_chunks(model):
            for layer in unwrap(chunk).decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if isinstance(router, TopKRouter):
                    self.handles.append(router.register_forward_hook(
                        self._counter(layer.layer_number - 1)))

    def _counter(self, index: int):
        def count(_module, _inputs, output):
            if torch.is_grad_enabled():  # a training forward, not rollout or log-prob passes
                routing_map = output[1]  # [tokens, experts], True where a token goes
                tokens = self.known(index)
                if tokens is not None:
                    routing_map = routing_map[tokens.to(routing_map.device)]
                self.counts[index] += routing_map.sum(0).to(self.counts.dtype)
        return count

    def reset(self) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.counts.zero_()
        clear_aux_losses_tracker()

    def metrics(self, micro_batches: int) -> dict:
        """Every rank calls it (collectives): the smallest and largest expert share over every
        layer and expert, and the load-balancing loss per layer and micro-batch (when on)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        counts = self.counts.clone()
        dist.all_reduce(counts)
        shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
        out = {"moe/expert_share_min": shares.min().item(),
               "moe/expert_share_max": shares.max().item()}
        tracker = get_moe_layer_wise_logging_tracker()
        if "load_balancing_loss" in tracker:
            # each tp and dp rank holds a value per layer of its stage and micro-batch: their mean
            values = tracker["load_balancing_loss"]["values"].to(self.counts)
            dist.all_reduce(values)
            copies = ps.get_tensor_model_parallel_world_size() * ps.get_data_parallel_world_size()
            out["moe/aux_loss"] = values.sum().item() / (
                self.layers * max(micro_batches, 1) * copies)
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
