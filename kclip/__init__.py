"""kclip: Knowledge-CLIP (Kao, arXiv 2412.03513) trained and evaluated fast.

Importing kclip is lean: it touches no GPU and needs neither Triton, DALI nor the compiled module. Each
accelerated part is chosen at call time and falls back to its pure-PyTorch reference where it cannot run.
"""

__version__ = "0.1.0"
