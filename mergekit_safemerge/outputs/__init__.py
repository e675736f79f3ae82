"""What runs write: the output folder (staged, locked, one kind per folder, manifest last), the
report (its schema, JSON, card and summary) and the scan's tables and picture."""
