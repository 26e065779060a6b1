"""Using a trained captioner: loading it from a checkpoint (inference) and checking uploaded images (uploads)."""
