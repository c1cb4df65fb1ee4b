"""Tokenizers: the runtime side, re-exported here, and the conversion side apart.

- :mod:`edgelm.tokenizer.runtime`: :class:`Tokenizer`, :class:`StreamDecoder` and the encoders
  behind them (the native ``_tok`` BPE encoder, ``tokenizers`` for ``hf-tokenizers-json``);
- :mod:`edgelm.tokenizer.wire`: the SentencePiece ``ModelProto`` protobuf codec;
- :mod:`edgelm.tokenizer.build`: building tokenizer blobs from GGUF vocabularies and Hugging
  Face checkpoints, imported only by conversion (``from edgelm.tokenizer.build import ...``).
"""

from .runtime import KIND_HF_JSON, KIND_SENTENCEPIECE, StreamDecoder, Tokenizer

__all__ = ["KIND_SENTENCEPIECE", "KIND_HF_JSON", "Tokenizer", "StreamDecoder"]
