"""simscale: Siamese Image Modeling (SIM) pretraining of ViTs at scale, on DeepSpeed."""

__version__ = "0.1.0"
