"""PEFT LoRA adapters: read as factors (``read``), written from factors (``write``)."""
