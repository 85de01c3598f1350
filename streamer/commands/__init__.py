"""Sub-commands of the ``foldstream`` CLI, one module per concern."""
