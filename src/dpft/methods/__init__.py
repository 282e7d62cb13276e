"""Fine-tuning methods built on the engine: which parameters train, and schedules."""
