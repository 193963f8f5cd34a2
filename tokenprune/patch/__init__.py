"""Model patches: how each supported model family runs a reducer inside its blocks."""
