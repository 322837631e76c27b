"""PRANCE MDP: ViT inference on a frozen supernet as a Gymnasium environment (PranceViT-v0)."""
