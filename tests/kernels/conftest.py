"""Kernel tests run the Triton kernels through the interpreter: the flag must be set before triton loads."""

import os

os.environ["TRITON_INTERPRET"] = "1"
