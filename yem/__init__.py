"""yem: DreamBooth LoRA for Stable Diffusion 3 on Apple Silicon, CUDA and CPU, as a DVC pipeline."""

__version__ = "0.1.0"
