"""Synthetic Llama-shaped models of any size, written straight to safetensors (no transformers
model is instantiated), for the memory and speed benchmarks.

The four SafeMERGE roles share one random base: ``aligned = unaligned + V`` (V dense, small),
``finetuned = aligned + B_f A_f`` and ``safety = aligned + B_s A_s`` (LoRA-like rank-``r``
updates) on the ``targets`` modules. Tensors are generated one block at a time, so building a
7B-shaped model needs memory for one block, not one model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

ROLES = ("unaligned", "aligned", "finetuned", "safety")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self) -> dict[str, tuple[int, ...]]:
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }

    def parameters(self) -> int:
        block = sum(torch.Size(s).numel() for s in self.block_tensors().values())
        return self.layers * block + 2 * self.vocab * self.hidden + self.hidden


# Llama-2-7B: hidden 4096, intermediate 11008, 32 blocks, 32 heads (MHA).
SHAPES = {
    "tiny": Shape(256, 688, 2, 8, 8, vocab=1024),
    "1b": Shape(2048, 5632, 16, 16, 16),
    "7b": Shape(4096, 11008, 32, 32, 32),
}


def _config(shape: Shape, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def build_synthetic_roles(
    out_dir: str,
    shape: Shape,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    adapters: bool = False,
    full_finetune: bool = False,
) -> dict[str, str]:
    """Write the four role folders (sharded safetensors + index + config); return their paths.

    With ``adapters``, also write PEFT LoRA adapter folders ``finetuned_adapter`` and
    ``safety_adapter`` (``lora_alpha = r``, so ``D = B A``) whose merge into ``aligned`` gives
    the ``finetuned`` and ``safety`` models (up to their dtype). With ``full_finetune`` the
    fine-tune's update of every target matrix is dense and full rank (a full fine-tune; no
    adapter can express it), the safety update stays rank ``r``.
    """
    if full_finetune and adapters:
        raise ValueError("a full fine-tune has no LoRA adapter")
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    dtype_name = str(dtype).removeprefix("torch.")
    paths = {role: os.path.join(out_dir, role) for role in ROLES}
    weight_maps: dict[str, dict[str, str]] = {role: {} for role in ROLES}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fp:
            json.dump(_config(shape, dtype_name), fp, indent=2)

    def randn(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * scale

    def write(shard: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        for role in ROLES:
            save_file({n: t[role].contiguous() for n, t in tensors.items()},
                      os.path.join(paths[role], shard), metadata={"format": "pt"})  # fmt: skip
            weight_maps[role].update({n: shard for n in tensors})

    factors: dict[str, dict[str, torch.Tensor]] = {"finetuned": {}, "safety": {}}

    def same(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {role: tensor for role in ROLES}

    shards = shape.layers + 2
    write(f"model-00001-of-{shards:05d}.safetensors", {
        "model.embed_tokens.weight": same(randn(shape.vocab, shape.hidden, scale=0.02).to(dtype))
    })  # fmt: skip
    for layer in range(shape.layers):
        tensors = {}
        for suffix, size in shape.block_tensors().items():
            base = randn(*size, scale=0.02)
            if len(size) == 1:
                tensors[f"model.layers.{layer}.{suffix}"] = same(torch.ones(size, dtype=dtype))
                continue
            aligned = base + randn(*size, scale=0.002)
            roles = {"unaligned": base, "aligned": aligned, "finetuned": aligned, "safety": aligned}
            if any(suffix.endswith(f"{t}.weight") for t in targets):
                out_f, in_f = size
                module = f"model.layers.{layer}.{suffix.removesuffix('.weight')}"
                for role in ("finetuned", "safety"):
                    if role == "finetuned" and full_finetune:
                        roles[role] = aligned + randn(out_f, in_f, scale=0.001)
                        continue
                    up, down = randn(out_f, rank, scale=0.01), randn(rank, in_f, scale=0.01)
                    roles[role] = aligned + up @ down
                    if adapters:
                        factors[role][f"base_model.model.{module}.lora_A.weight"] = down
                        factors[role][f"base_model.model.{module}.lora_B.weight"] = up
            tensors[f"model.layers.{layer}.{suffix}"] = {r: t.to(dtype) for r, t in roles.items()}
        write(f"model-{layer + 2:05d}-of-{shards:05d}.safetensors", tensors)
    write(f"model-{shards:05d}-of-{shards:05d}.safetensors", {
        "model.norm.weight": same(torch.ones(shape.hidden, dtype=dtype)),
        "lm_head.weight": same(randn(shape.vocab, shape.hidden, scale=0.02).to(dtype)),
    })  # fmt: skip
    for role in ROLES:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_maps[role]}
        with open(os.path.join(paths[role], "model.safetensors.index.json"), "w") as fp:
            json.dump(index, fp, indent=2)
    if adapters:
        for role, tensors in factors.items():
            folder = paths[f"{role}_adapter"] = os.path.join(out_dir, f"{role}_adapter")
            os.makedirs(folder, exist_ok=True)
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
            config = {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": paths["aligned"],
                "r": rank,
                "lora_alpha": rank,
                "lora_dropout": 0.0,
                "target_modules": list(targets),
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "inference_mode": True,
            }
            with open(os.path.join(folder, "adapter_config.json"), "w") as fp:
                json.dump(config, fp, indent=2)
    return paths
