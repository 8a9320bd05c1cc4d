"""gram: Gradient-Regulated Meta-Prompt Learning (GRAM) for vision-language models, as a pipeline."""

__version__ = "0.1.0"
