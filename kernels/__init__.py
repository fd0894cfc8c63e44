"""kclip.kernels: the Triton kernels of kclip (shipped in the wheel from the top-level kernels/ folder).

Triton reads TRITON_INTERPRET when a kernel is *defined*, so the mode is read once, here, at import: the
kernels run compiled on CUDA tensors, or under the interpreter on CPU tensors when TRITON_INTERPRET=1.
"""

import os

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
