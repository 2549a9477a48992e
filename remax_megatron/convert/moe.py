"""Mixture-of-experts causal LMs <-> megatron-core: Llama-style attention (convert/llama.py) with
a routed MLP in every layer.

megatron's MoE layer: ``mlp.router.weight`` [experts, hidden]; expert e's SwiGLU as
``mlp.experts.local_experts.{e}.linear_fc1`` = [gate; up] and ``linear_fc2`` = down (e counted over
all experts here: the layout-independent form; sharding.py numbers them per expert-parallel rank);
Qwen2-MoE's shared expert as ``mlp.shared_experts.linear_fc1/linear_fc2`` and its sigmoid gate
``mlp.shared_experts.gate_weight`` [1, hidden]. Transformers stores the experts one by one
(save_pretrained writes them so, whatever its in-memory layout), named per family below.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.config import ModelConfig
from . import llama
from .rules import Rule, same, stacked


@dataclass(frozen=True)
class MoEFamily:
    """One naming of the experts in Hugging Face checkpoints."""

    block: str  # the MoE block under each layer: "mlp." or "block_sparse_moe."
    gate_up_down: tuple[str, str, str]  # expert projections: gate, up, down

    def expert(self, p: str, e: int, which: int) -> str:
        return f"{p}{self.block}experts.{e}.{self.gate_up_down[which]}.weight"

    def mlp(self, c: ModelConfig, m: str, p: str) -> list[Rule]:
        out = [same(m + "mlp.router.weight", p + self.block + "gate.weight")]
        for e in range(c.num_experts):
            x = f"{m}mlp.experts.local_experts.{e}."
            out += [stacked(x + "linear_fc1.weight", (self.expert(p, e, 0), self.expert(p, e, 1))),
                    same(x + "linear_fc2.weight", self.expert(p, e, 2))]
        if c.moe_shared_expert_ffn_hidden_size is not None:
            s = p + "mlp.shared_expert."
            out += [stacked(m + "mlp.shared_experts.linear_fc1.weight",
                            (s + "gate_proj.weight", s + "up_proj.weight")),
                    same(m + "mlp.shared_experts.linear_fc2.weight", s + "down_proj.weight")]
        if c.moe_shared_expert_gate:
            out.append(same(m + "mlp.shared_experts.gate_weight", p + "mlp.shared_expert_gate.weight"))
        return out

    def rules(self, c: ModelConfig, reward: bool) -> list[Rule]:
        return llama.rules(c, reward, mlp=self.mlp)

    def hf_shapes(self, c: ModelConfig, reward: bool) -> dict[str, tuple[int, ...]]:
        h, f = c.hidden_size, c.expert_ffn_hidden_size
        shapes = llama.hf_shapes(c, reward)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes[p + self.block + "gate.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                shapes.update({self.expert(p, e, 0): (f, h), self.expert(p, e, 1): (f, h),
                               self.expert(p, e, 2): (h, f)})
            fs = c.moe_shared_expert_ffn_hidden_size
            if fs is not None:
                s = p + "mlp.shared_expert."
                shapes.update({s + "gate_proj.weight": (fs, h), s + "up_proj.weight": (fs, h),
                               s + "down_proj.weight": (h, fs),
                               p + "mlp.shared_expert_gate.weight": (1, h)})
        return shapes

    @staticmethod
    def normalize_hf_name(name: str) -> str | None:
        return llama.normalize_hf_name(name)


MIXTRAL = MoEFamily(block="block_sparse_moe.", gate_up_down=("w1", "w3", "w2"))
QWEN_MOE = MoEFamily(block="mlp.", gate_up_down=("gate_proj", "up_proj", "down_proj"))
FAMILIES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE}
