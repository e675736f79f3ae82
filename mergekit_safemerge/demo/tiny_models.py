"""Tiny local models for the demo, the tests and the benchmarks (no model hub, no download).

:func:`build_role_models` writes the four SafeMERGE roles of one small architecture to folders:

* ``unaligned``: a randomly initialised model (the "pretrained base");
* ``aligned``:   unaligned + ``V`` on every 2-D weight, ``V`` = a strong rank-``k`` part plus
  weak full-rank noise (alignment updates are close to low rank);
* ``finetuned``: aligned + a rank-``2r`` update ``D`` on the target modules, mixing a part inside
  the column space of ``V``'s strong directions and a part outside it with a per-matrix mix, so
  that ``rho`` spreads over ``[0, 1]`` across matrices;
* ``safety``:    aligned + a rank-``r`` update ``S`` on the target modules.

Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mergekit_safemerge.core.targets import matches_targets

ARCHITECTURES = ("llama", "qwen2", "gemma2")
ROLE_FOLDERS = ("unaligned", "aligned", "finetuned", "safety")


def tiny_config(arch: str = "llama", num_layers: int = 2):
    """A ~100k-parameter config of ``arch`` (GQA for all: 4 query heads, 2 key/value heads)."""
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v projections carry biases
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma2":  # extra norms, tied embeddings, head_dim set explicitly
        return transformers.Gemma2Config(**common, head_dim=16, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")


def save_tiny_tokenizer(out_dir: str) -> None:
    """A character-level tokenizer over the 256-entry vocabulary, saved next to a model."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    characters = [chr(c) for c in range(32, 32 + 256 - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(out_dir)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q[:, :cols]


def alignment_update(
    shape: Sequence[int], generator: torch.Generator, rank: int = 4, noise: float = 0.02
) -> torch.Tensor:
    """``V`` = strong rank-``rank`` part (Frobenius norm 1) + weak full-rank noise."""
    out_features, in_features = shape
    u = _orthonormal(out_features, rank, generator)
    w = _orthonormal(in_features, rank, generator)
    strength = torch.linspace(1.0, 0.5, rank)
    strong = (u * strength) @ w.T
    strong = strong / torch.linalg.vector_norm(strong)
    noise_part = torch.randn(out_features, in_features, generator=generator)
    return strong + noise * noise_part / torch.linalg.vector_norm(noise_part)


def mixed_update(
    alignment: torch.Tensor,
    inside: float,
    generator: torch.Generator,
    rank: int = 2,
    scale: float = 0.5,
) -> torch.Tensor:
    """A rank-``2 rank`` update ``D``: fraction ``inside`` of it lies in ``V``'s top directions."""
    out_features, in_features = alignment.shape
    u, _, _ = torch.linalg.svd(alignment, full_matrices=False)
    b_in = u[:, :rank]
    b_out = torch.randn(out_features, rank, generator=generator)
    b_out = b_out - b_in @ (b_in.T @ b_out)  # remove the strong directions
    b_out = b_out / torch.linalg.vector_norm(b_out, dim=0, keepdim=True)
    a_in = torch.randn(rank, in_features, generator=generator)
    a_out = torch.randn(rank, in_features, generator=generator)
    inner = b_in @ a_in
    outer = b_out @ a_out
    update = inside * inner / torch.linalg.vector_norm(inner) + (1.0 - inside) * outer / (
        torch.linalg.vector_norm(outer)
    )
    return scale * update / torch.linalg.vector_norm(update)


def low_rank_update(
    shape: Sequence[int], generator: torch.Generator, rank: int = 2, scale: float = 0.3
) -> torch.Tensor:
    out_features, in_features = shape
    update = torch.randn(out_features, rank, generator=generator) @ torch.randn(
        rank, in_features, generator=generator
    )
    return scale * update / torch.linalg.vector_norm(update)


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and "embed" not in name and "lm_head" not in name


@dataclass(frozen=True)
class RoleModels:
    """Folders of the four roles, plus the update added to every target matrix."""

    paths: dict[str, str]
    targets: tuple[str, ...]
    inside_fraction: dict[str, float]  # tensor name -> share of D inside V's strong directions


def build_role_models(
    out_dir: str,
    arch: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 2,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> RoleModels:
    """Write ``unaligned``, ``aligned``, ``finetuned`` and ``safety`` folders under ``out_dir``."""
    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)

    unaligned = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    aligned, finetuned, safety = dict(unaligned), dict(unaligned), dict(unaligned)
    target_names = sorted(
        n for n, t in unaligned.items() if _is_matrix(n, t) and matches_targets(n, tuple(targets))
    )
    # Spread the share of D inside V over [0, 1], in a seeded order over the target matrices.
    order = torch.randperm(len(target_names), generator=generator).tolist()
    steps = max(len(target_names) - 1, 1)
    inside = {name: order[i] / steps for i, name in enumerate(target_names)}

    for name, tensor in unaligned.items():
        if not _is_matrix(name, tensor):
            continue
        v = alignment_update(tensor.shape, generator)
        aligned[name] = tensor + v
        if name in inside:
            finetuned[name] = aligned[name] + mixed_update(v, inside[name], generator)
            safety[name] = aligned[name] + low_rank_update(tensor.shape, generator)
        else:
            finetuned[name] = aligned[name]
            safety[name] = aligned[name]

    paths = {}
    for role, state in zip(ROLE_FOLDERS, (unaligned, aligned, finetuned, safety), strict=True):
        path = os.path.join(out_dir, role)
        model.load_state_dict(state)
        model.to(dtype).save_pretrained(path, safe_serialization=True)
        model.float()
        if tokenizer:
            save_tiny_tokenizer(path)
        paths[role] = path
    return RoleModels(paths=paths, targets=tuple(targets), inside_fraction=inside)
