"""The merged model's card: mergekit's own generator, with SafeMERGE's section appended, and
the copy of the configuration (``mergekit_config.yml``) mergekit would write."""

from __future__ import annotations

import os

import mergekit.card
import yaml
from mergekit.config import MergeConfiguration


def _card_config(merge_config: MergeConfiguration) -> MergeConfiguration:
    """The configuration with local model folders as absolute paths, so that mergekit's card
    never asks the Hub about a local folder written like ``models/aligned``."""

    def absolute(reference: str) -> str:
        path, plus, lora = reference.partition("+")
        path = os.path.abspath(path) if os.path.isdir(path) else path
        if plus and os.path.isdir(lora):
            lora = os.path.abspath(lora)
        return path + plus + lora

    def walk(node):
        if isinstance(node, dict):
            return {
                k: absolute(v) if k in ("model", "base_model") and isinstance(v, str) else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return MergeConfiguration.model_validate(walk(yaml.safe_load(merge_config.to_yaml())))


def write_config_copy(
    merge_config: MergeConfiguration, config_source: str | None, folder: str
) -> None:
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as fp:
        fp.write(config_source or merge_config.to_yaml())


def write_model_card(
    merge_config: MergeConfiguration,
    config_source: str | None,
    folder: str,
    name: str,
    section: str,
) -> None:
    """mergekit's model card with our ``section`` appended, as ``README.md`` in ``folder``."""
    source = config_source or merge_config.to_yaml()
    card = mergekit.card.generate_card(
        config=_card_config(merge_config), config_yaml=source, name=name
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(card + section)
