"""vitpipe: distributed Vision Transformer pretraining and transfer (WebDataset + DeepSpeed + Ray Train + MLflow)."""

__version__ = "0.1.0"
