"""Disk, RAM and arithmetic a 7B-9B SafeMERGE run needs, computed from the models' published
configurations (not measured). docs/recipes.md shows this script's output; tests/test_docs.py
checks that the two agree. Usage::

    .venv/bin/python benchmarks/resource_estimate.py
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Config:
    """The dimensions that fix a decoder's weights (from the model's config.json)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden / heads
    tied: bool = False
    qkv_bias: bool = False

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def matrices(self) -> dict[str, tuple[int, int]]:
        q, kv, h, i = (
            self.heads * self.dim,
            self.kv_heads * self.dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }  # fmt: skip

    def parameters(self) -> int:
        block = sum(o * i for o, i in self.matrices().values())
        block += 2 * self.hidden * (2 if self.name.startswith("Gemma") else 1)  # norms
        if self.qkv_bias:
            block += self.heads * self.dim + 2 * self.kv_heads * self.dim
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * block + embeddings + self.hidden


MODELS = (
    Config("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    Config("Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    Config("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256),
    Config("Gemma-2-9B", 3584, 14336, 42, 16, 8, 256000, head_dim=256, tied=True),
)
TARGETS = ("q_proj", "v_proj")
LORA_RANK = 8


def rows() -> list[tuple[str, list[str]]]:
    def per_model(fn) -> list[str]:
        return [fn(m) for m in MODELS]

    def gb(value: float) -> str:
        return f"{value / GB:.1f} GB"

    def dense(m: Config) -> float:
        return m.layers * sum(2 * o * i * min(o, i) for t, (o, i) in m.matrices().items()
                              if t in TARGETS)  # fmt: skip

    def factored(m: Config) -> float:
        # M = V^T L, V M, and three r x r Grams: about 4 * out * in * r per matrix
        return m.layers * sum(4 * o * i * LORA_RANK for t, (o, i) in m.matrices().items()
                              if t in TARGETS)  # fmt: skip

    return [
        ("parameters", per_model(lambda m: f"{m.parameters() / 1e9:.2f} B")),
        ("one model, bfloat16 / float32",
         per_model(lambda m: f"{2 * m.parameters() / GB:.1f} / {4 * m.parameters() / GB:.1f} GB")),
        ("disk, `aligned+adapter` recipe: two 16-bit downloads, two float32 LoRA merges in the "
         "cache, bfloat16 output", per_model(lambda m: gb((2 * 2 + 2 * 4 + 2) * m.parameters()))),
        ("disk, adapters read as factors (`finetuned_adapter`, `safety_adapter`): two downloads, "
         "bfloat16 output", per_model(lambda m: gb((2 * 2 + 2) * m.parameters()))),
        ("RAM, LoRA merge step of the `+` route (one float32 model in memory)",
         per_model(lambda m: gb(4 * m.parameters()))),
        ("RAM, largest tensor group (the embedding matrix of four inputs, float32)",
         per_model(lambda m: gb(4 * 4 * m.vocab * m.hidden))),
        ("criterion, q_proj + v_proj of all blocks, dense route (multiply-adds)",
         per_model(lambda m: f"{dense(m):.1e}")),
        (f"criterion, same, factored route, LoRA rank {LORA_RANK} (multiply-adds)",
         per_model(lambda m: f"{factored(m):.1e}")),
    ]  # fmt: skip


def table() -> str:
    lines = ["| | " + " | ".join(m.name for m in MODELS) + " |", "|---" * (len(MODELS) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
