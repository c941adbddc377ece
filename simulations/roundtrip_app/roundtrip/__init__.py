"""A minimal Flower app: each round sends a small array to every node and gets it back (no torch)."""
