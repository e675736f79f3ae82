"""Shared fixtures: tiny models of each architecture and tiny PEFT LoRA adapters, built once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mergekit_safemerge.demo.tiny_models import RoleModels, build_role_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_roles(tmp_path_factory):
    """``tiny_roles(arch, layers=2)`` -> :class:`RoleModels`, built once per session and key."""
    cache: dict[tuple, RoleModels] = {}

    def build(arch: str = "llama", layers: int = 2) -> RoleModels:
        key = (arch, layers)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{layers}")
            cache[key] = build_role_models(str(folder), arch, num_layers=layers, seed=layers)
        return cache[key]

    return build


def make_lora_adapter(
    base_dir: str,
    out_dir: str,
    *,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.05,
    **lora_options,
) -> str:
    """A real PEFT LoRA adapter on ``base_dir`` with non-zero random A and B factors.

    ``lora_options`` go to ``peft.LoraConfig`` (e.g. ``use_rslora``, ``alpha_pattern``).
    """
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        **lora_options,
    )
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def lora_adapters(tiny_roles, tmp_path_factory):
    """Task and safety LoRA adapters on the tiny Llama's aligned model."""
    roles = tiny_roles("llama")
    folder = tmp_path_factory.mktemp("lora")
    return {
        "finetuned": make_lora_adapter(roles.paths["aligned"], str(folder / "task"), seed=1),
        "safety": make_lora_adapter(roles.paths["aligned"], str(folder / "safety"), seed=2),
    }


@pytest.fixture
def roles(tiny_roles, tmp_path):
    """Copies of the tiny 2-block Llama role models that a test may corrupt."""
    from helpers import copy_role_models

    return copy_role_models(tiny_roles("llama"), tmp_path / "models")
