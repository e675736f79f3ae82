"""Synthetic Llama-shaped models of any size, written straight to safetensors (no transformers
model is instantiated), for the memory and speed benchmarks.

The four SafeMERGE roles share one random base: ``aligned = unaligned + V`` (V dense, small),
``finetuned = aligned + B_f A_f`` and ``safety = aligned + B_s A_s`` (LoRA-like rank-``r``
updates) on the ``targets`` modules. Tensors are generated one block at a time, so building a
7B-shaped model needs memory for one block, not one model. Each file is written once, straight
into its model's folder from the tensors' own memory (:func:`write_safetensors`: no serialized
copy of a shard is built first), and only the roles asked for are written as full models.

With ``repeat_blocks`` the random tensors of one block (and its adapter factors) are generated
once and written for every layer: each layer still has its own tensors, under its own names, in
its own shard, but they hold the same values. A benchmark's timing does not depend on the values
(every tensor is read, computed on and written all the same), and a 7B build then costs writing
its bytes, not drawing billions of random numbers.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

ROLES = ("unaligned", "aligned", "finetuned", "safety")
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


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

    def adapter_parameters(self, targets: tuple[str, ...], rank: int) -> int:
        """Parameters of one rank-``rank`` LoRA adapter on ``targets`` (A and B of each)."""
        sizes = [s for n, s in self.block_tensors().items()
                 if any(n.endswith(f"{t}.weight") for t in targets)]  # fmt: skip
        return self.layers * sum(rank * (out_f + in_f) for out_f, in_f in sizes)


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


def write_safetensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """One safetensors file: the 8-byte little-endian header length, the JSON header (padded
    with spaces to 8 bytes, as safetensors does), then each tensor's bytes in name order,
    written from the tensor's own memory."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    items = sorted(tensors.items())
    offset = 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fp:
        fp.write(struct.pack("<Q", len(raw)))
        fp.write(raw)
        for _name, tensor in items:
            fp.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


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
    roles: tuple[str, ...] = ROLES,
    repeat_blocks: bool = False,
) -> dict[str, str]:
    """Write the role folders (sharded safetensors + index + config); return their paths.

    ``roles`` are the roles written as full models (all four by default). With ``adapters``,
    also write PEFT LoRA adapter folders ``finetuned_adapter`` and ``safety_adapter``
    (``lora_alpha = r``, so ``D = B A``) whose merge into ``aligned`` gives the ``finetuned``
    and ``safety`` models (up to their dtype), whether or not those are written. With
    ``full_finetune`` the fine-tune's update of every target matrix is dense and full rank (a
    full fine-tune; no adapter can express it), the safety update stays rank ``r``. With
    ``repeat_blocks`` every layer holds the values of layer 0 (see the module docstring). The
    random stream does not depend on ``roles``: a role's tensors are the same whichever others
    are written.
    """
    if full_finetune and adapters:
        raise ValueError("a full fine-tune has no LoRA adapter")
    if unknown := set(roles) - set(ROLES):
        raise ValueError(f"unknown roles {sorted(unknown)}")
    written = tuple(r for r in ROLES if r in roles)
    generator = torch.Generator().manual_seed(seed)
    dtype_name = str(dtype).removeprefix("torch.")
    paths = {role: os.path.join(out_dir, role) for role in written}
    weight_maps: dict[str, dict[str, str]] = {role: {} for role in written}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fp:
            json.dump(_config(shape, dtype_name), fp, indent=2)

    def randn(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * scale

    def write(shard: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        for role in written:
            write_safetensors(os.path.join(paths[role], shard),
                              {n: t[role] for n, t in tensors.items()},
                              metadata={"format": "pt"})  # fmt: skip
            weight_maps[role].update({n: shard for n in tensors})

    def same(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {role: tensor for role in written}

    def block() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, tuple]]]:
        """One block's tensors per role ({suffix: {role: tensor}}) and LoRA factors
        ({role: {module suffix: (A, B)}}), in the random order the benchmarks always used."""
        tensors, factors = {}, {"finetuned": {}, "safety": {}}
        for suffix, size in shape.block_tensors().items():
            base = randn(*size, scale=0.02)
            if len(size) == 1:
                tensors[suffix] = same(torch.ones(size, dtype=dtype))
                continue
            aligned = base + randn(*size, scale=0.002)
            values = {"unaligned": base, "aligned": aligned}
            if any(suffix.endswith(f"{t}.weight") for t in targets):
                out_f, in_f = size
                for role in ("finetuned", "safety"):
                    if role == "finetuned" and full_finetune:
                        update = randn(out_f, in_f, scale=0.001)
                        if role in written:
                            values[role] = aligned + update
                        continue
                    up, down = randn(out_f, rank, scale=0.01), randn(rank, in_f, scale=0.01)
                    if role in written:
                        values[role] = aligned + up @ down
                    if adapters:
                        factors[role][suffix.removesuffix(".weight")] = (down, up)
            tensors[suffix] = {r: values.get(r, aligned).to(dtype) for r in written}
        return tensors, factors

    shards = shape.layers + 2
    write(f"model-00001-of-{shards:05d}.safetensors", {
        "model.embed_tokens.weight": same(randn(shape.vocab, shape.hidden, scale=0.02).to(dtype))
    })  # fmt: skip
    lora: dict[str, dict[str, torch.Tensor]] = {"finetuned": {}, "safety": {}}
    first = None
    for layer in range(shape.layers):
        tensors, factors = first if first is not None else block()
        if repeat_blocks:
            first = tensors, factors
        prefix = f"model.layers.{layer}."
        write(f"model-{layer + 2:05d}-of-{shards:05d}.safetensors",
              {prefix + suffix: t for suffix, t in tensors.items()})  # fmt: skip
        for role, modules in factors.items():
            for module, (down, up) in modules.items():
                lora[role][f"base_model.model.{prefix}{module}.lora_A.weight"] = down
                lora[role][f"base_model.model.{prefix}{module}.lora_B.weight"] = up
    write(f"model-{shards:05d}-of-{shards:05d}.safetensors", {
        "model.norm.weight": same(torch.ones(shape.hidden, dtype=dtype)),
        "lm_head.weight": same(randn(shape.vocab, shape.hidden, scale=0.02).to(dtype)),
    })  # fmt: skip
    for role in written:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_maps[role]}
        with open(os.path.join(paths[role], "model.safetensors.index.json"), "w") as fp:
            json.dump(index, fp, indent=2)
    if adapters:
        for role, tensors in lora.items():
            folder = paths[f"{role}_adapter"] = os.path.join(out_dir, f"{role}_adapter")
            os.makedirs(folder, exist_ok=True)
            write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
            config = {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": os.path.join(out_dir, "aligned"),
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
