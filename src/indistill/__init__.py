"""indistill: InDistill knowledge distillation for compressing image models."""

__version__ = "0.1.0"
