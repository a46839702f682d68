"""Layers as Flax linen modules (used through `init`/`apply`), and the one
scan over blocks in the code base (`stack.scan_blocks`)."""
