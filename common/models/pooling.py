"""How an early-exit off-ramp reads a layer's output (no torch here: the scripts' parsers use these names)."""

FIRST_TOKEN, MEAN = "first_token", "mean"
POOLINGS = (FIRST_TOKEN, MEAN)
