"""Hugging Face model plumbing: family adapters, hooks, tokenisation, loading and saving, scoring."""
