"""What training reads: images and captions, the checks before any model loads, the cached embeddings and
latents, and the training set joined by sample id. May import the top level, yem.hardware and yem.model."""
