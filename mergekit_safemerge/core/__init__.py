"""The pure SafeMERGE rule: torch at most, no mergekit, nothing of the package above it.

``settings`` (the one parameter table), ``updates`` (dense or LoRA-factor updates, the blocked
passes over a matrix), ``criterion`` (rho and its routes), ``decide`` (threshold and ranking
decisions, the sweep), ``combine`` (merge rules by name), ``rule`` (measure -> decide -> combine
for one matrix), ``precision``, ``records``, ``roles``, ``targets``. ``settings``, ``decide``,
``records``, ``roles`` and ``targets`` import no torch either (``safemerge report`` and help read
some of them).
"""
