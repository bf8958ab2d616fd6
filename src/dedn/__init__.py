"""dedn: the Dual-Expert Distillation Network (a reconstruction) and a few-shot segmentation toolkit."""

__version__ = "0.1.0"
