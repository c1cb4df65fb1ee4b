"""Gemma 3n's input front ends (`edgelm.multimodal`) against transformers: the log-mel audio
features equal `Gemma3nAudioFeatureExtractor`, the pixels equal the SigLIP image processor
(Pillow flavour), decoded audio equals transformers' soundfile + soxr loader, and bad files
are a `BadInputError` naming the file."""

from __future__ import annotations

import io
import sys
import wave

import numpy as np
import pytest

from edgelm.errors import BadInputError
from edgelm.multimodal import (AudioFeatureConfig, Gemma3nAudioFeatures, ImageConfig, load_audio, load_image,
                               log_mel_features, preprocess_image, resample)

from .conftest import espeak_wav

try:
    import torch

    torch.set_num_threads(1)  # two threads ran small models far slower on the shared hosts
except ImportError:
    pass

SR = 16_000


def _close(mine: np.ndarray, ref: np.ndarray, rel: float = 1e-5, atol: float | None = None):
    """Equal within `rel` of the reference's range, or within `atol` absolute when given (in
    practice they agree to the bit)."""
    ref = np.asarray(ref)
    assert mine.shape == ref.shape and mine.dtype == ref.dtype, (mine.shape, mine.dtype, ref.shape, ref.dtype)
    limit = atol if atol is not None else rel * (float(ref.max() - ref.min()) or 1.0)
    err = float(np.abs(mine.astype(np.float64) - ref).max())
    assert err <= limit, f"max |diff| {err} > {limit}"


# ---------------------------------------------------------------------------------------------
# signals


def _sweep(n=24_037):  # 50 Hz -> 7.9 kHz, not a multiple of the hop (160) nor of 128
    t = np.arange(n) / SR
    f0, f1, dur = 50.0, 7900.0, n / SR
    return (0.6 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))).astype(np.float32)


def _noise(n=32_000, seed=0):  # a multiple of both the hop and 128
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _click(n=8_053):  # silence with one click: the floor of the log and a broadband frame
    x = np.zeros(n, np.float32)
    x[4000] = 1.0
    x[4001] = -0.5
    return x


SIGNALS = {"sweep": _sweep, "noise": _noise, "click": _click,
           "one-frame": lambda: _noise(513, seed=1),  # the shortest audio that makes a frame
           "over-30s": lambda: _noise(480_000 + 1_234, seed=2) * 0.1}  # truncated to 30 s


@pytest.fixture(scope="module")
def hf_extractor():
    pytest.importorskip("transformers")
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor


def _reference(extractor_cls, cfg, waves):
    out = extractor_cls(**cfg)(waves, return_tensors="np")
    return out["input_features"], out["input_features_mask"]


# ---------------------------------------------------------------------------------------------
# log-mel features


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_features_equal_transformers(hf_extractor, signal):
    x = SIGNALS[signal]()
    feats, mask = log_mel_features(x)
    ref_f, ref_m = _reference(hf_extractor, {}, x)  # a single waveform: a batch of one
    assert feats.shape[1] == 128 and feats.dtype == np.float32 and mask.dtype == bool
    _close(feats, ref_f[0])
    np.testing.assert_array_equal(mask, ref_m[0])
    assert mask.any()


CONFIGS = {
    "checkpoint-like": {  # the fields of a Gemma 3n preprocessor_config.json, derived ones included
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "frame_length": 512, "hop_length": 160, "fft_length": 1024, "fft_overdrive": True, "dither": 0.0,
        "input_scale_factor": 1.0, "max_frequency": 7600.0, "min_frequency": 125.0, "mel_floor": 1e-05,
        "padding_side": "right", "padding_value": 0.0, "per_bin_mean": None, "per_bin_stddev": None,
        "preemphasis": 0.97, "preemphasis_htk_flavor": True, "return_attention_mask": True},
    "left-padded": {"padding_side": "left", "padding_value": 0.25},
    "per-bin-norm": {"per_bin_mean": list(np.linspace(-6, 1, 128)), "per_bin_stddev": list(np.linspace(0.5, 3, 128))},
    "other-geometry": {"feature_size": 80, "fft_overdrive": False, "preemphasis_htk_flavor": False,
                       "input_scale_factor": 2.0, "min_frequency": 0.0, "max_frequency": 8000.0,
                       "frame_length_ms": 25.0, "hop_length_ms": 12.5, "mel_floor": 1e-3},
    "no-preemphasis": {"preemphasis": 0.0},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_features_follow_the_config(hf_extractor, name):
    cfg = CONFIGS[name]
    for x in (_sweep(), _click()):
        ref_f, ref_m = _reference(hf_extractor, {k: v for k, v in cfg.items() if k != "feature_extractor_type"}, x)
        feats, mask = Gemma3nAudioFeatures(cfg)(x)
        _close(feats, ref_f[0])
        np.testing.assert_array_equal(mask, ref_m[0])


def test_batch_pads_like_transformers(hf_extractor):
    waves = [_sweep(), _click(), _noise(7_777, seed=3)]
    feats, mask = Gemma3nAudioFeatures().batch(waves)
    ref_f, ref_m = _reference(hf_extractor, {}, waves)
    _close(feats, ref_f)
    np.testing.assert_array_equal(mask, ref_m)
    assert mask.sum(1).tolist() == [m.sum() for m in ref_m] and mask[1].sum() < mask[0].sum()


def test_float64_and_list_input(hf_extractor):
    x = _sweep().astype(np.float64) * 0.9
    ref_f, _ = _reference(hf_extractor, {}, x.tolist())
    _close(log_mel_features(x.tolist())[0], ref_f[0])
    _close(log_mel_features(x)[0], ref_f[0])


def test_spoken_sentence_from_espeak(hf_extractor, tmp_path):
    wav = espeak_wav(tmp_path / "speech.wav", "The quick brown fox jumps over the lazy dog.")
    x, rate = load_audio(wav, sampling_rate=SR)
    assert rate == SR and len(x) > SR // 2
    ref_f, ref_m = _reference(hf_extractor, {}, x)
    feats, mask = log_mel_features(x)
    _close(feats, ref_f[0])
    np.testing.assert_array_equal(mask, ref_m[0])


def test_feature_input_errors():
    fx = Gemma3nAudioFeatures()
    for bad, words in [(np.zeros(0, np.float32), "zero-length"), (np.zeros(512, np.float32), "too short"),
                       (np.full(2000, np.nan, np.float32), "finite"), (np.zeros((2, 2000)), "1-D")]:
        with pytest.raises(BadInputError, match=words):
            fx(bad)
    with pytest.raises(BadInputError, match="44100 Hz"):
        fx(_noise(), sampling_rate=44_100)
    with pytest.raises(BadInputError, match="per_bin_mean"):
        AudioFeatureConfig.from_dict({"per_bin_mean": [0.0] * 3})
    with pytest.raises(BadInputError, match="padding_side"):
        AudioFeatureConfig.from_dict({"padding_side": "middle"})


# ---------------------------------------------------------------------------------------------
# decoding and resampling


def _tone(freq, rate, seconds=1.0, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec))
    a, b, c = np.log(spec[k - 1:k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)  # parabolic interpolation


def test_stdlib_wav_without_soundfile(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # WAV needs no extra
    ints = (np.arange(-2000, 2000, 7, dtype=np.int16) * 8).repeat(2)  # stereo, both channels equal
    path = tmp_path / "pcm16.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(22_050)
        w.writeframes(ints.tobytes())
    x, rate = load_audio(path)
    assert rate == 22_050 and x.dtype == np.float32
    np.testing.assert_array_equal(x, ints[::2] / np.float32(32768))
    x2, _ = load_audio(path.read_bytes(), name="clip.wav")
    np.testing.assert_array_equal(x, x2)
    streamed = bytearray(path.read_bytes())  # a stream writer's "size unknown" data chunk
    streamed[40:44] = b"\xff\xff\xff\xff"
    np.testing.assert_array_equal(load_audio(bytes(streamed))[0], x)
    path.with_suffix(".flac").write_bytes(b"fLaC" + bytes(100))
    with pytest.raises(BadInputError, match=r"pcm16\.flac.*edgelm\[audio\]"):
        load_audio(path.with_suffix(".flac"))


@pytest.fixture(scope="module")
def sf():
    return pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def hf_load_audio():
    pytest.importorskip("transformers")
    from transformers.audio_utils import load_audio as hf_load

    return lambda path, rate: hf_load(str(path), sampling_rate=rate, backend="soundfile")


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
                                         ("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("WAVEX", "PCM_16"),
                                         ("WAVEX", "FLOAT"), ("WAV", "ULAW"), ("FLAC", "PCM_16"),
                                         ("FLAC", "PCM_24"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_decoding_equals_transformers_loader(sf, hf_load_audio, tmp_path, fmt, subtype):
    rate = 22_050
    stereo = np.stack([_sweep(20_000) * 0.8, _tone(330, rate, 20_000 / rate, 0.4)], axis=1)
    path = tmp_path / f"clip.{subtype.lower()}.{fmt.lower()}"
    sf.write(str(path), stereo, rate, format=fmt, subtype=subtype)
    x, got_rate = load_audio(path)
    assert got_rate == rate and x.ndim == 1 and x.dtype == np.float32
    np.testing.assert_array_equal(x, hf_load_audio(path, rate))  # same decode, same mono mix
    if fmt != "MP3":
        assert len(x) == len(stereo)
    if subtype in ("FLOAT", "DOUBLE"):
        np.testing.assert_allclose(x, stereo.mean(1), atol=1e-7)
    x16, r16 = load_audio(path, sampling_rate=SR)  # resampled as transformers resamples
    assert r16 == SR
    _close(x16, hf_load_audio(path, SR), rel=1e-6)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resample_keeps_a_tone(rate):
    pytest.importorskip("soxr")
    x = _tone(1000.0, rate, seconds=1.3)
    y = resample(x, rate, SR)
    assert y.dtype == np.float32 and len(y) == -(-len(x) * SR // rate)
    mid = y[800:-800]  # away from the filter's edges
    assert abs(_peak_hz(mid, SR) - 1000.0) < 0.5
    assert abs(np.sqrt(np.mean(mid ** 2)) - 0.5 / np.sqrt(2)) < 0.01
    np.testing.assert_array_equal(resample(y, SR, SR), y)


def test_resample_without_soxr(monkeypatch):
    monkeypatch.setitem(sys.modules, "soxr", None)
    with pytest.raises(BadInputError, match=r"edgelm\[audio\]"):
        resample(_tone(440, 44_100), 44_100, SR)
    assert len(resample(_noise(100), SR, SR)) == 100  # nothing to do needs no package


def _bad_audio_files(tmp_path, sf_mod):
    good = io.BytesIO()
    with wave.open(good, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
        w.writeframes((_noise(4000) * 20000).astype(np.int16).tobytes())
    good = good.getvalue()
    empty_wav = io.BytesIO()
    with wave.open(empty_wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
    files = {
        "empty.wav": (b"", "empty"),
        "garbage.wav": (np.random.default_rng(0).bytes(3000), ""),
        "cut-in-data.wav": (good[:len(good) // 2], "truncated"),
        "cut-in-header.wav": (good[:30], ""),
        "no-samples.wav": (empty_wav.getvalue(), "no samples"),
        "no-data-chunk.wav": (b"RIFF" + (28).to_bytes(4, "little") + good[8:36], "no data chunk"),
        "odd-block.wav": (good[:40] + (7999).to_bytes(4, "little") + good[44:44 + 7999], "whole number"),
        "nan.wav": (_float_wav(np.array([0.1, np.nan, 0.2], np.float32)), "non-finite"),
        "notes.txt": (b"these are not samples\n" * 20, ""),
    }
    if sf_mod is not None:
        flac = io.BytesIO()
        sf_mod.write(flac, _noise(20_000), SR, format="FLAC")
        files["cut.flac"] = (flac.getvalue()[: len(flac.getvalue()) // 2], "")
    for fname, (data, _) in files.items():
        (tmp_path / fname).write_bytes(data)
    return files


def _float_wav(x: np.ndarray) -> bytes:
    data = x.astype("<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + SR.to_bytes(4, "little") + \
        (SR * 4).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + (16).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def test_bad_audio_files_name_the_file(tmp_path):
    try:
        import soundfile as sf_mod
    except ImportError:
        sf_mod = None
    for fname, (_, words) in _bad_audio_files(tmp_path, sf_mod).items():
        with pytest.raises(BadInputError) as e:
            load_audio(tmp_path / fname)
        assert fname in str(e.value) and words in str(e.value), str(e.value)
        with pytest.raises(BadInputError, match="upload-7"):
            load_audio((tmp_path / fname).read_bytes(), name="upload-7")
    for missing in (tmp_path / "absent.wav", tmp_path):
        with pytest.raises(BadInputError, match="cannot read"):
            load_audio(missing)


# ---------------------------------------------------------------------------------------------
# images


@pytest.fixture(scope="module")
def PIL():
    return pytest.importorskip("PIL.Image")


def _make_images(tmp_path, Image):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:120, 0:200]
    grad = np.stack([xx * 255 // 199, yy * 255 // 119, (xx + yy) * 255 // 318], -1).astype(np.uint8)
    wide = (np.sin(np.mgrid[0:100, 0:300][1] / 9.0)[..., None] * [90, 60, 30] + 128).astype(np.uint8)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    made = {
        "noise.png": (Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), {}),
        "gradient.jpg": (Image.fromarray(grad), {"quality": 90}),
        "wide.png": (Image.fromarray(wide), {}),
        "tiny.png": (Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)), {}),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {}),
        "la.png": (Image.fromarray(rgba[..., [0, 3]], "LA"), {}),
        "gray.png": (Image.fromarray(grad[..., 0]), {}),
        "cmyk.jpg": (Image.fromarray(grad).convert("CMYK"), {"quality": 95}),
        "photo.webp": (Image.fromarray(grad), {"quality": 80}),
    }
    pal = Image.fromarray(grad).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    made["palette-transparent.png"] = (pal, {"transparency": 3})
    rotated = Image.fromarray(grad[:30, :50])
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    made["exif-rotated.jpg"] = (rotated, {"exif": exif, "quality": 95})
    for fname, (img, kw) in made.items():
        img.save(tmp_path / fname, **kw)
    return sorted(made)


IMAGE_CONFIGS = {
    "siglip-defaults": {},
    "bilinear-no-normalize": {"resample": 2, "do_normalize": False},
    "other-size-and-stats": {"size": {"height": 224, "width": 320}, "resample": 1,
                             "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]},
}


def _hf_pixels(img, cfg):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    cfg = {"size": {"height": 768, "width": 768}, **cfg}
    return SiglipImageProcessorPil(**cfg)(images=img, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("cfg_name", sorted(IMAGE_CONFIGS))
def test_pixels_equal_transformers(PIL, tmp_path, cfg_name):
    pytest.importorskip("transformers")
    from PIL import ImageOps
    from transformers.image_utils import load_image as hf_load_image

    cfg = IMAGE_CONFIGS[cfg_name]
    h, w = (cfg.get("size") or {"height": 768, "width": 768}).values()
    for fname in _make_images(tmp_path, PIL):
        path = tmp_path / fname
        mine = preprocess_image(load_image(path), config=cfg)
        assert mine.shape == (3, h, w) and mine.dtype == np.float32
        # transparency: the processor's own conversion of an image object (onto white)
        _close(mine, _hf_pixels(ImageOps.exif_transpose(PIL.open(path)), cfg), atol=1e-5)
        # transformers' path loader: EXIF applied, alpha dropped
        dropped = preprocess_image(path, config=cfg, flatten_alpha=False)
        _close(dropped, _hf_pixels(hf_load_image(str(path)), cfg), atol=1e-5)
        if fname not in ("rgba.png", "la.png", "palette-transparent.png"):
            np.testing.assert_array_equal(mine, dropped)


def test_exif_orientation_and_sizes(PIL, tmp_path):
    _make_images(tmp_path, PIL)
    assert load_image(tmp_path / "exif-rotated.jpg").size == (30, 50)  # 50 x 30 stored, shown upright
    assert load_image((tmp_path / "tiny.png").read_bytes()).size == (7, 5)
    assert preprocess_image(tmp_path / "wide.png", 64).shape == (3, 64, 64)
    assert preprocess_image(tmp_path / "wide.png", (32, 96)).shape == (3, 32, 96)
    x = preprocess_image(tmp_path / "noise.png", config={"do_normalize": False})
    assert 0.0 <= x.min() and x.max() <= 1.0
    cfg = ImageConfig.from_dict({"size": {"height": 512, "width": 256}, "resample": "bilinear",
                                 "image_mean": 0.5, "do_center_crop": None})
    assert (cfg.height, cfg.width, cfg.resample, cfg.image_mean) == (512, 256, 2, (0.5, 0.5, 0.5))
    for bad in ({"size": {"shortest_edge": 224}}, {"do_center_crop": True}, {"resample": 9}):
        with pytest.raises(BadInputError, match="image config"):
            ImageConfig.from_dict(bad)


def test_bad_images_name_the_file(PIL, tmp_path):
    _make_images(tmp_path, PIL)
    png, jpg = (tmp_path / "noise.png").read_bytes(), (tmp_path / "gradient.jpg").read_bytes()
    bad = {"empty.png": b"", "garbage.jpg": np.random.default_rng(1).bytes(2000),
           "cut.png": png[: len(png) // 2], "cut.jpg": jpg[: len(jpg) // 2], "header-only.png": png[:40]}
    for fname, data in bad.items():
        (tmp_path / fname).write_bytes(data)
        with pytest.raises(BadInputError) as e:
            load_image(tmp_path / fname)
        assert fname in str(e.value), str(e.value)
        with pytest.raises(BadInputError, match="photo-3"):
            load_image(data, name="photo-3")
    with pytest.raises(BadInputError, match="absent.png.*cannot read"):
        load_image(tmp_path / "absent.png")


def test_missing_pillow_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(BadInputError, match=r"edgelm\[vision\]"):
        load_image(tmp_path / "any.png")
    with pytest.raises(BadInputError, match=r"edgelm\[vision\]"):
        preprocess_image(b"\x89PNG")
