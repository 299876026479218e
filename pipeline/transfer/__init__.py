"""Transfer learning from the model registry: resolve a registered checkpoint, adapt it to the downstream task
(new zero head, resampled position embeddings), fine-tune with the pretraining worker or evaluate few-shot, log
and register the result."""
