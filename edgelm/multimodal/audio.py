"""Audio input for Gemma 3n: decode a file, resample it to 16 kHz, and compute the log-mel
features the audio tower reads.

* `load_audio(src)` decodes WAV itself (PCM 8/16/24/32-bit integer and 32/64-bit float, plain
  or WAVE_FORMAT_EXTENSIBLE) and any other format (FLAC, OGG/Vorbis, MP3, ...) through the
  optional `soundfile` package (the `audio` extra). Channels are averaged to mono; samples
  come back as float32 in [-1, 1], exactly as `soundfile.read(dtype="float32")` gives them.
* `resample(x, sr_from, sr_to)` uses the optional `soxr` package (also the `audio` extra) at
  its "HQ" quality, then pads or trims to ceil(n * sr_to / sr_from) samples: the same steps
  as `librosa.load` and transformers' `load_audio`, so a file loaded here at 16 kHz equals
  what transformers hands its feature extractor.
* `Gemma3nAudioFeatures(config)(samples)` equals transformers'
  `Gemma3nAudioFeatureExtractor` (`input_features`, `input_features_mask`) for one waveform,
  and `.batch([...])` for several (padded together, as transformers pads a batch). The
  config is the checkpoint's preprocessor_config.json as a dict; missing fields take
  transformers' defaults.

The feature recipe (transformers' defaults): pad to a multiple of 128 samples (truncating
beyond 30 s), cut frames of 513 samples every 160 (10 ms at 16 kHz), apply HTK-style
preemphasis (0.97) that turns 513 samples into 512, a periodic Hann window of 512, a 1024-point
real FFT ("overdrive": twice the next power of two), magnitudes, a 128-band HTK mel filter
bank over 125-7600 Hz without area normalisation, and log(max(mel, 1e-5)); optional per-bin
mean and stddev normalisation follows. Frame i is valid (mask True) when its first sample is
a real (unpadded) sample. The arithmetic keeps transformers' dtypes step by step (float32
frames and FFT, float64 filter bank and log), so results match it to the last bit on the same
numpy.

Errors about the input (unreadable, corrupt, truncated or empty files, too-short audio,
missing optional packages) are `edgelm.errors.BadInputError` with the file named.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError

TARGET_RATE = 16_000
AUDIO_EXTRA = "pip install 'edgelm[audio]'"

_FORMAT_PCM, _FORMAT_FLOAT, _FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


# ---------------------------------------------------------------------------------------------
# decoding


def _read_source(src, name: str | None) -> tuple[bytes, str]:
    """The bytes of `src` (a path or bytes-like) and the name errors should use."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), name or "<audio bytes>"
    if isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        try:
            with open(src, "rb") as f:
                return f.read(), label
        except OSError as e:
            raise BadInputError(f"{label}: cannot read the audio file: {e.strerror or e}") from None
    raise BadInputError(f"audio must be a file path or bytes, not {type(src).__name__}")


def _wav_samples(data: bytes, label: str) -> tuple[np.ndarray, int] | None:
    """Decode a RIFF/WAVE file to ([frames, channels] float32, rate); None when the file is
    not RIFF/WAVE or its encoding is one this parser leaves to soundfile (ADPCM, A-law, ...)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + size > len(data):
                raise BadInputError(f"{label}: corrupt WAV file: the fmt chunk is truncated")
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _FORMAT_EXTENSIBLE and size >= 40:  # the sub-format GUID starts with the tag
                (tag,) = struct.unpack_from("<H", data, body + 24)
            fmt = (tag, channels, rate, align, bits)
        elif cid == b"data":
            if fmt is None:
                raise BadInputError(f"{label}: corrupt WAV file: sample data before the fmt chunk")
            have = len(data) - body
            if size == 0xFFFFFFFF:  # written as a stream: the data runs to the end of the file
                size = have - have % max(fmt[3], 1)
            elif size > have:
                raise BadInputError(f"{label}: truncated WAV file: the data chunk declares {size} bytes "
                                    f"but only {have} follow")
            return _decode_wav_data(data[body:body + size], fmt, label)
        pos = body + size + (size & 1)  # chunks are padded to even sizes
    what = "no data chunk" if fmt else "no fmt chunk"
    raise BadInputError(f"{label}: corrupt or truncated WAV file: {what}")


def _decode_wav_data(raw: bytes, fmt, label: str) -> tuple[np.ndarray, int] | None:
    tag, channels, rate, align, bits = fmt
    width = bits // 8
    if tag not in (_FORMAT_PCM, _FORMAT_FLOAT) or bits % 8 or (tag, width) not in {
            (_FORMAT_PCM, 1), (_FORMAT_PCM, 2), (_FORMAT_PCM, 3), (_FORMAT_PCM, 4),
            (_FORMAT_FLOAT, 4), (_FORMAT_FLOAT, 8)}:
        return None  # compressed or unusual: soundfile may know it
    if channels < 1 or rate < 1 or align != channels * width:
        raise BadInputError(f"{label}: corrupt WAV file: {channels} channel(s), {rate} Hz, "
                            f"{bits}-bit samples in blocks of {align} bytes")
    if len(raw) % align:
        raise BadInputError(f"{label}: corrupt WAV file: {len(raw)} bytes of samples is not a whole "
                            f"number of {align}-byte frames")
    if tag == _FORMAT_FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:  # 8-bit WAV is unsigned, centred on 128
        x = ((np.frombuffer(raw, np.uint8).astype(np.int32) - 128) / 128.0).astype(np.float32)
    elif width == 2:
        x = (np.frombuffer(raw, "<i2") / 32768.0).astype(np.float32)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = (v / float(1 << 23)).astype(np.float32)
    else:
        x = (np.frombuffer(raw, "<i4") / float(1 << 31)).astype(np.float32)
    return x.reshape(-1, channels), rate


def _soundfile_samples(data: bytes, label: str) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf
    except (ImportError, OSError):
        raise BadInputError(f"{label}: not a WAV file edgelm decodes by itself; FLAC, OGG, MP3 and other "
                            f"formats need the audio extra: {AUDIO_EXTRA}") from None
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, expected = f.samplerate, f.frames
            x = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors carry no stable type; all mean "cannot decode"
        msg = re.sub(r"^Error opening <[^>]*>: ", "", str(e).strip()) or type(e).__name__
        raise BadInputError(f"{label}: not a readable audio file ({msg})") from None
    if 0 <= expected < 2**62 and len(x) < expected:
        raise BadInputError(f"{label}: truncated audio file: decoded {len(x)} of {expected} frames")
    return x, rate


def load_audio(src, *, sampling_rate: int | None = None, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file (a path, or the file's bytes) to (mono float32 samples, rate).

    Multi-channel audio is averaged to mono. With `sampling_rate` the samples are resampled
    to it (`resample`) and that rate is returned. `name` labels errors for bytes input.
    Unreadable, corrupt, truncated or empty files, files holding zero samples and files
    holding NaN or infinite samples raise `BadInputError` naming the file.
    """
    data, label = _read_source(src, name)
    if not data:
        raise BadInputError(f"{label}: the audio file is empty (0 bytes)")
    decoded = _wav_samples(data, label)
    x, rate = decoded if decoded is not None else _soundfile_samples(data, label)
    if x.shape[0] == 0:
        raise BadInputError(f"{label}: the audio file holds no samples")
    if not np.isfinite(x).all():
        raise BadInputError(f"{label}: the audio file holds non-finite samples (NaN or infinity)")
    # [channels, frames].mean(axis=0): the reduction transformers' loader does
    mono = x.T.mean(axis=0) if x.shape[1] > 1 else x[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if sampling_rate is not None and sampling_rate != rate:
        return resample(mono, rate, sampling_rate), int(sampling_rate)
    return mono, int(rate)


def resample(x, sr_from: int, sr_to: int = TARGET_RATE) -> np.ndarray:
    """Resample mono audio from `sr_from` to `sr_to` Hz (float32 out).

    soxr at "HQ" quality (a polyphase filter bank with a steep, linear-phase low-pass),
    the result padded with zeros or trimmed to ceil(len(x) * sr_to / sr_from) samples, as
    librosa and transformers do. Needs the `soxr` package (the `audio` extra).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise BadInputError(f"resample takes mono (1-D) samples, got shape {x.shape}")
    for r in (sr_from, sr_to):
        if not (isinstance(r, (int, np.integer)) and r > 0):
            raise BadInputError(f"sample rates must be positive integers, got {r!r}")
    if sr_from == sr_to:
        return x.copy()
    try:
        import soxr
    except ImportError:
        raise BadInputError(f"resampling {sr_from} Hz audio to {sr_to} Hz needs the soxr package: "
                            f"{AUDIO_EXTRA}") from None
    n = -(-len(x) * int(sr_to) // int(sr_from))
    y = soxr.resample(x, int(sr_from), int(sr_to), quality="soxr_hq") if len(x) else x
    y = np.pad(y, (0, max(0, n - len(y))))[:n]
    return np.ascontiguousarray(y, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# log-mel features


@dataclass(frozen=True)
class AudioFeatureConfig:
    """The feature extractor's settings: the fields of a Gemma 3n preprocessor_config.json that
    transformers' `Gemma3nAudioFeatureExtractor` reads, with its defaults. (The checkpoint's
    `frame_length`, `hop_length` and `fft_length` fields are derived values that transformers
    recomputes from the ones below and ignores; so does this.)"""

    feature_size: int = 128
    sampling_rate: int = TARGET_RATE
    padding_value: float = 0.0
    padding_side: str = "right"
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    def __post_init__(self):
        def bad(why):
            raise BadInputError(f"audio feature config: {why}")

        if int(self.feature_size) < 1 or int(self.sampling_rate) < 1:
            bad(f"feature_size and sampling_rate must be positive ({self.feature_size}, {self.sampling_rate})")
        if self.frame_length_ms <= 0 or self.hop_length_ms <= 0:
            bad("frame_length_ms and hop_length_ms must be positive")
        if self.padding_side not in ("left", "right"):
            bad(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        if not 0 <= self.min_frequency < self.max_frequency:
            bad(f"need 0 <= min_frequency < max_frequency ({self.min_frequency}, {self.max_frequency})")
        if self.mel_floor <= 0:
            bad(f"mel_floor must be positive, not {self.mel_floor}")
        for key in ("per_bin_mean", "per_bin_stddev"):
            v = getattr(self, key)
            if v is not None and len(v) != self.feature_size:
                bad(f"{key} has {len(v)} values, feature_size is {self.feature_size}")

    @classmethod
    def from_dict(cls, d: dict | None) -> AudioFeatureConfig:
        """Take the known fields of a preprocessor_config.json dict; null or absent fields keep
        their defaults; other keys (the image processor's, derived values) are ignored."""
        kw = {}
        for f in dataclasses.fields(cls):
            v = (d or {}).get(f.name)
            if v is None:
                continue
            try:
                if f.name in ("per_bin_mean", "per_bin_stddev"):
                    v = tuple(float(a) for a in np.asarray(v, dtype=np.float64).reshape(-1))
                elif f.name in ("feature_size", "sampling_rate"):
                    v = int(v)
                elif f.name in ("preemphasis_htk_flavor", "fft_overdrive"):
                    v = bool(v)
                elif f.name != "padding_side":
                    v = float(v)
            except (TypeError, ValueError):
                raise BadInputError(f"audio feature config: {f.name} = {v!r} is not valid") from None
            kw[f.name] = v
        return cls(**kw)


def mel_filter_bank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                    fft_length: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, [n_freqs, n_mels] float64, no area normalisation.

    Band j rises linearly from mel point j to j+1 and falls to j+2, the n_mels + 2 points
    evenly spaced in mel between f_min and f_max; FFT bin k sits at k * sample_rate / fft_length.
    """
    bins_hz = np.arange(n_freqs, dtype=np.float32) * (sample_rate / fft_length)
    mel_lo = 2595.0 * math.log10(1.0 + f_min / 700.0)
    mel_hi = 2595.0 * math.log10(1.0 + f_max / 700.0)
    edges = 700.0 * (10 ** (np.linspace(mel_lo, mel_hi, n_mels + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    dist = edges[None, :] - bins_hz[:, None]  # [n_freqs, n_mels + 2]
    rising = -dist[:, :-2] / widths[:-1]
    falling = dist[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1, np.float32), np.minimum(rising, falling))


class Gemma3nAudioFeatures:
    """Gemma 3n's audio front end: waveform(s) at 16 kHz -> log-mel features and a frame mask.

    `config` is a preprocessor_config.json dict or an `AudioFeatureConfig` (None: defaults).
    Calling the object with one waveform returns (features [frames, feature_size] float32,
    mask [frames] bool); `batch` takes several and pads them together.
    """

    def __init__(self, config: dict | AudioFeatureConfig | None = None):
        cfg = config if isinstance(config, AudioFeatureConfig) else AudioFeatureConfig.from_dict(config)
        self.config = cfg
        self.frame_length = int(round(cfg.sampling_rate * cfg.frame_length_ms / 1000.0))
        self.hop_length = int(round(cfg.sampling_rate * cfg.hop_length_ms / 1000.0))
        if self.frame_length < 1 or self.hop_length < 1:
            raise BadInputError("audio feature config: frame and hop must each span at least one sample")
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if cfg.fft_overdrive else 1)
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)
        self.mel_filters = mel_filter_bank(self.fft_length // 2 + 1, cfg.min_frequency, cfg.max_frequency,
                                           cfg.feature_size, cfg.sampling_rate, self.fft_length)
        self._mean = None if cfg.per_bin_mean is None else np.asarray(cfg.per_bin_mean, np.float64)
        self._std = None if cfg.per_bin_stddev is None else np.asarray(cfg.per_bin_stddev, np.float64)

    def __call__(self, samples, *, sampling_rate: int | None = None, max_length: int | None = 480_000,
                 pad_to_multiple_of: int | None = 128, rng: np.random.Generator | None = None):
        """Features of one waveform: (float32 [frames, feature_size], bool [frames]).

        `max_length` (samples, rounded up to `pad_to_multiple_of`) truncates longer audio, 30 s
        by default as in transformers; None keeps it all. `rng` drives the dither when the
        config sets one (transformers draws from numpy's global generator instead).
        """
        feats, mask = self.batch([samples], sampling_rate=sampling_rate, max_length=max_length,
                                 pad_to_multiple_of=pad_to_multiple_of, rng=rng)
        return feats[0], mask[0]

    def batch(self, waveforms, *, sampling_rate: int | None = None, max_length: int | None = 480_000,
              pad_to_multiple_of: int | None = 128, rng: np.random.Generator | None = None):
        """Features of several waveforms padded to a common length (the longest, rounded up to
        `pad_to_multiple_of`): (float32 [batch, frames, feature_size], bool [batch, frames])."""
        cfg = self.config
        if sampling_rate is not None and sampling_rate != cfg.sampling_rate:
            raise BadInputError(f"audio is at {sampling_rate} Hz; the features need {cfg.sampling_rate} Hz "
                                "(resample it first)")
        waves = [self._check_wave(w, i) for i, w in enumerate(waveforms)]
        if not waves:
            raise BadInputError("no audio given")
        if max_length is not None:
            limit = _round_up(max_length, pad_to_multiple_of)
            waves = [w[:limit] for w in waves]
        target = _round_up(max(len(w) for w in waves), pad_to_multiple_of)
        n_frames = (target - (self.frame_length + 1)) // self.hop_length + 1
        if n_frames < 1:
            raise BadInputError(f"audio of {max(len(w) for w in waves)} samples is too short: one "
                                f"{cfg.frame_length_ms:g} ms frame needs {self.frame_length + 1} samples "
                                f"at {cfg.sampling_rate} Hz")
        feats, masks = [], []
        for w in waves:
            pad = target - len(w)
            valid = np.ones(len(w), dtype=bool)
            edge = (0, pad) if cfg.padding_side == "right" else (pad, 0)
            w = np.pad(w, edge, constant_values=np.float32(cfg.padding_value))
            valid = np.pad(valid, edge)
            feats.append(self._log_mel(w, rng))
            masks.append(valid[::self.hop_length][:n_frames])
        return np.stack(feats), np.stack(masks)

    @staticmethod
    def _check_wave(w, i: int) -> np.ndarray:
        a = np.asarray(w, dtype=np.float32)
        if a.ndim != 1:
            raise BadInputError(f"audio {i}: expected mono samples (1-D), got shape {a.shape}")
        if a.size == 0:
            raise BadInputError(f"audio {i}: zero-length audio")
        if not np.isfinite(a).all():
            raise BadInputError(f"audio {i}: samples must be finite (found NaN or infinity)")
        return a

    def _log_mel(self, wave: np.ndarray, rng) -> np.ndarray:
        cfg = self.config
        if cfg.dither > 0.0:
            rng = rng if rng is not None else np.random.default_rng()
            wave = wave + cfg.dither * rng.standard_normal(wave.shape).astype(wave.dtype)
        if cfg.input_scale_factor != 1.0:
            wave = wave * cfg.input_scale_factor
        size = self.frame_length + 1  # one extra sample feeds the preemphasis
        n = (len(wave) - size) // self.hop_length + 1
        frames = np.lib.stride_tricks.as_strided(
            wave, shape=(n, size), strides=(wave.strides[0] * self.hop_length, wave.strides[0]), writeable=False)
        p = cfg.preemphasis
        if p > 0.0 and cfg.preemphasis_htk_flavor:
            frames = np.concatenate([frames[:, :1] * (1.0 - p), frames[:, 1:-1] - p * frames[:, :-2]], axis=-1)
        elif p > 0.0:
            frames = frames[:, 1:] - p * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.maximum(spectrum @ self.mel_filters, np.float64(cfg.mel_floor)))
        if self._mean is not None:
            log_mel = log_mel - self._mean
        if self._std is not None:
            log_mel = log_mel / self._std
        return log_mel.astype(np.float32)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def log_mel_features(samples, config: dict | AudioFeatureConfig | None = None, **kwargs):
    """`Gemma3nAudioFeatures(config)(samples, **kwargs)`: (features [frames, 128] float32,
    mask [frames] bool) for one 16 kHz waveform."""
    return Gemma3nAudioFeatures(config)(samples, **kwargs)
