"""ling-train: the thin application that composes the Ling packages into a training run."""
