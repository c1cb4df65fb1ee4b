from .schemes import SCHEMES, QTensor, Scheme, dequantize, get_scheme, quantize

__all__ = ["SCHEMES", "QTensor", "Scheme", "dequantize", "get_scheme", "quantize"]
