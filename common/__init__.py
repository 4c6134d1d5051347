"""The leaf every package may import: errors the CLI turns into one line, and the typed config schema."""
