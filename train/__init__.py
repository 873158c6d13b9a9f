"""Finetuning and re-embedding: builds new embedding versions from the store's images."""
