"""Wire formats shared by the worldstream services (no pickle on the network)."""
from .tensors import (DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_TENSOR_BYTES, MAX_MESSAGE_BYTES, TensorAssembler,
                      WireFormatError, pack_tensor, pack_tensors, unpack_tensors)

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "DEFAULT_MAX_TENSOR_BYTES", "MAX_MESSAGE_BYTES", "TensorAssembler",
           "WireFormatError", "pack_tensor", "pack_tensors", "unpack_tensors"]
