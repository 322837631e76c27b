"""PRANCE decision side: CLS features extractor, PPO training, baseline policies and the deployable AdaptiveViT."""
