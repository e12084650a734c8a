"""CUDA C++ sources of mose_fast, installed as ``mose_fast.csrc`` and compiled lazily on a CUDA
machine by :mod:`mose_fast.cuda_ext` (torch.utils.cpp_extension + ninja).  Never built at install."""
