"""Wire layer: message dataclasses, frame codec and page-batch encoding. No I/O here."""

from .codec import FrameDecoder, decode_body, encode
from .messages import PROTOCOL_VERSION

__all__ = ["FrameDecoder", "decode_body", "encode", "PROTOCOL_VERSION"]
