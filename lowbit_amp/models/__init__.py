"""Small reference models used by the CLI, the examples and the convergence tests."""

from lowbit_amp.models.llama_block import LlamaBlock
from lowbit_amp.models.tiny_gpt import RMSNorm, TinyGPT, TinyGPTConfig

__all__ = ["LlamaBlock", "RMSNorm", "TinyGPT", "TinyGPTConfig"]
