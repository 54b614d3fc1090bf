"""Data: tokenizers and chat templates, datasets."""
