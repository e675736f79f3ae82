"""The pure SafeMERGE rule: torch only, no mergekit, nothing of the package above it.

``settings`` (the one parameter table), ``updates`` (dense or LoRA-factor updates), ``criterion``
(rho and its routes), ``decide`` (threshold and ranking decisions, the sweep), ``combine`` (merge
rules by name), ``rule`` (measure -> decide -> combine for one matrix), ``records``, ``roles``,
``targets``.
"""
