"""Triton kernels of DAAL (installed as ``daal_triton.kernels``), one module per operator.

Importing a submodule imports triton; set ``TRITON_INTERPRET=1`` before that to run on the CPU.
"""
