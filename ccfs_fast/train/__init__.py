"""Training: models, the fused bank, the one training recipe, the one loss, the capturable step and its
CUDA graphs, the one loop, prediction."""
