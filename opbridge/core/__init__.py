"""Contracts and dispatch: op signatures, validation, formats, settings and the backend registry."""
from .errors import ConfigError, OpError, OpTypeError, UnsupportedError
from .formats import QuantTensor, dequantize, quantize

__all__ = ["ConfigError", "OpError", "OpTypeError", "UnsupportedError", "QuantTensor", "dequantize", "quantize"]
