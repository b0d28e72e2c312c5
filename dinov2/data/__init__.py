"""Images in, tensors out: reading image files robustly and the evaluation transform."""
