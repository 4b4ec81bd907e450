"""Tests of the PyTorch model code and Hugging Face checkpoint folders."""
