"""Transfer learning: PeterRec's patches in a frozen pretrained network."""
