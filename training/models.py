"""LoRA training jobs and artifacts (the training issue builds them here)."""
