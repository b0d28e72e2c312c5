"""DINOv2 as MLOps software: curation, pretraining, distillation and evaluation of self-supervised ViTs."""

__version__ = "0.1.0"
