"""Triton kernels of mose_fast, installed as ``mose_fast.kernels``.

Each module holds one operation's whole stack: torch reference, Triton kernel, launcher and
public function.  Importing this package never touches CUDA; triton itself is optional.
"""
