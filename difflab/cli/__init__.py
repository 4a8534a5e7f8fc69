"""Command line: the only layer that wires concrete classes together."""
