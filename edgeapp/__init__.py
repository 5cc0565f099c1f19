"""The torch-free runtime: bundle format, images, tokenizer, runners and the CLI.

Nothing under this package may import torch, open_clip or torch.onnx (tests enforce it).
"""
