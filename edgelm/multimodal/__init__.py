"""Gemma 3n's input front ends: audio and images to the arrays its towers read, in numpy.

`audio`: `load_audio`, `resample` (to 16 kHz), `Gemma3nAudioFeatures` / `log_mel_features`
(equal to transformers' `Gemma3nAudioFeatureExtractor`). `image`: `load_image`,
`preprocess_image` (equal to transformers' SigLIP image processor, Pillow flavour).
Only numpy is needed to import this package; decoding non-WAV audio and resampling need the
`audio` extra (soundfile, soxr), images need the `vision` extra (Pillow), and each says so
with a `BadInputError` when missing.
"""

from .audio import (AudioFeatureConfig, Gemma3nAudioFeatures, load_audio, log_mel_features, mel_filter_bank,
                    resample)
from .image import ImageConfig, load_image, preprocess_image, to_rgb

__all__ = ["AudioFeatureConfig", "Gemma3nAudioFeatures", "ImageConfig", "load_audio", "load_image",
           "log_mel_features", "mel_filter_bank", "preprocess_image", "resample", "to_rgb"]
