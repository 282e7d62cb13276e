"""dpft: differentially private fine-tuning of foundation models."""
