"""Gemma 3n with its towers: images and audio in prompts, end to end, against transformers.

A tiny random Gemma3nForConditionalGeneration with both real towers (MobileNet-V5 with narrow
channels, a 2-layer conformer; tests/gemma3n_fixtures.make_tiny_gemma3n_mm) goes through
`edgelm convert`; prompts holding images and audio must give transformers' token ids (its
Gemma3nProcessor) and logits, on both backends, and every surface (Python, CLI run and chat,
the server) must take them. Bad media are clear errors that change nothing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("soundfile")
torch.set_num_threads(1)  # two torch threads ran small models 10-200x slower on this host

sys.path.insert(0, str(Path(__file__).parent))
import gemma3n_fixtures as g3n  # noqa: E402
from timm_support import need_timm  # noqa: E402

from edgelm.convert.common import convert  # noqa: E402
from edgelm.convert.hf import load_hf_source  # noqa: E402
from edgelm.errors import BadInputError, CapacityError  # noqa: E402
from edgelm.format.bundle import Bundle  # noqa: E402
from edgelm.models._inputs import SoftRows  # noqa: E402
from edgelm.runtime.content import Audio, Image, Text  # noqa: E402
from edgelm.runtime.conversation import _feed_parts, render_chat_spans  # noqa: E402
from edgelm.runtime.engine import Engine  # noqa: E402
from edgelm.runtime.session import GenerationStats  # noqa: E402

from .conftest import assert_clean_error, espeak_wav, run_cli  # noqa: E402

SR = 16_000


def wav_bytes(seconds: float, freq: float = 220.0, rate: int = SR, seed: int = 0) -> bytes:
    """A speech-like test signal: a decaying tone with vibrato plus a little noise, 16-bit PCM."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t + 3 * np.sin(2 * np.pi * 5 * t)) * np.exp(-0.3 * t)
    x = x + 0.01 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def wav_samples(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def png_bytes(w: int = 97, h: int = 61, seed: int = 0) -> bytes:
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), rng.integers(0, 256, (h, w))], -1)
    buf = io.BytesIO()
    PILImage.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    need_timm()
    tmp = tmp_path_factory.mktemp("g3n-mm")
    d = g3n.make_tiny_gemma3n_mm(tmp / "ckpt", seed=5)
    full = tmp / "mm.edgelm"
    convert(load_hf_source(d), full, scheme="fp32", tower_scheme="fp32", progress=False)
    text = tmp / "text.edgelm"
    convert(load_hf_source(d, keep=()), text, scheme="fp32", progress=False)
    media = tmp / "media"
    media.mkdir()
    (media / "a.png").write_bytes(png_bytes(97, 61, 1))
    (media / "b.png").write_bytes(png_bytes(40, 130, 2))
    (media / "a.wav").write_bytes(wav_bytes(1.3, 220, seed=1))
    # resampled to 16 kHz; as long as a.wav: transformers encodes a prompt's clips as one padded
    # batch, and a clip's last rows then depend on the longer clips' padding, where edgelm
    # encodes each clip alone (as transformers does a clip that is alone in its prompt)
    (media / "b.wav").write_bytes(wav_bytes(1.3, 330, rate=22_050, seed=2))
    return SimpleNamespace(dir=d, full=full, text=text, media=media,
                           ids=json.loads((d / "mm_ids.json").read_text()))


@pytest.fixture(scope="module")
def reference(mm):
    from transformers import Gemma3nForConditionalGeneration

    return Gemma3nForConditionalGeneration.from_pretrained(str(mm.dir), dtype=torch.float32,
                                                           attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def processor(mm):
    from transformers import AutoTokenizer, Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(mm.dir))
    size = {"height": g3n.MM_IMAGE_SIZE, "width": g3n.MM_IMAGE_SIZE}
    return Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                            image_processor=SiglipImageProcessorPil(size=size, resample=2), tokenizer=tok,
                            chat_template=tok.chat_template)


@pytest.fixture(scope="module")
def engines(mm):
    made = {}

    def get(backend: str, path=None) -> Engine:
        key = (backend, str(path or mm.full))
        if key not in made:
            made[key] = Engine(path or mm.full, backend=backend, max_tokens=1024, kv_dtype="f32", prefill_chunk=96)
        return made[key]

    yield get
    for e in made.values():
        e.close()


def _theirs(processor, model, messages, images=(), audios=()):
    """transformers: (ids, logits) of chat messages with images (PIL) and audio (16 kHz arrays)."""
    from PIL import Image as PILImage

    hf_msgs = [{"role": m["role"], "content": [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image" if isinstance(p, Image) else "audio"}
        for p in m["content"]]} for m in messages]
    prompt = processor.apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=True)
    kw = {}
    if images:
        kw["images"] = [PILImage.open(io.BytesIO(b)) for b in images]
    if audios:
        kw["audio"] = list(audios)
    inp = processor(text=prompt, return_tensors="pt", add_special_tokens=False, **kw)
    with torch.no_grad():
        logits = model(**inp).logits[0].numpy()
    return inp["input_ids"][0].tolist(), logits


def _ours(eng, messages):
    """edgelm: (ids, logits at every position) of chat messages with Image / Audio parts."""
    ids, spans = render_chat_spans(eng, messages)
    rows = np.concatenate([np.arange(s, s + len(p.values)) for s, p in spans])
    soft = SoftRows(rows.astype(np.int64), np.concatenate([p.values for _, p in spans]))
    s = eng.create_session()
    out = [s._forward(ids[c:c + eng.prefill_chunk], "all", soft.window(c, c + eng.prefill_chunk))
           for c in range(0, len(ids), eng.prefill_chunk)]
    return ids, np.concatenate(out)


def _close(ours, ref, rel=1e-3, what=""):
    assert ours.shape == ref.shape, what
    err = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert err.max() < rel, f"{what}: worst row {int(err.argmax())} rel err {err.max():.2e}"


def _same_argmax(ours, ref):
    """The greedy token is the same at every position whose top two logits are further apart
    than the two sides differ (closer ones are ties within float32 rounding)."""
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(ours - ref).max(axis=1)
    assert clear.mean() > 0.9
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def _messages(mm, kinds: str):
    """A user message with the media of `kinds` (i: image a, j: image b, a: audio a, b: audio b)."""
    files = {"i": Image(mm.media / "a.png"), "j": Image(mm.media / "b.png"),
             "a": Audio(mm.media / "a.wav"), "b": Audio(mm.media / "b.wav")}
    content = ["Look:"] + [files[k] for k in kinds] + ["What do you see and hear?"]
    return [{"role": "user", "content": content}]


def _media_inputs(mm, kinds: str):
    from edgelm.multimodal import load_audio

    images = [(mm.media / f"{'a' if k == 'i' else 'b'}.png").read_bytes() for k in kinds if k in "ij"]
    audios = [load_audio(mm.media / f"{k}.wav", sampling_rate=SR)[0] for k in kinds if k in "ab"]
    return images, audios


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("kinds", ["a", "i", "iab", "jia"])
def test_prompt_ids_and_logits_equal_transformers(mm, reference, processor, engines, kinds):
    """The processor's token ids (expansion of each image and audio clip) and the logits at
    every position within 1e-3 relative, fp32, numpy reference backend; the same greedy token
    wherever it is not a tie within rounding."""
    msgs = _messages(mm, kinds)
    images, audios = _media_inputs(mm, kinds)
    ref_ids, ref = _theirs(processor, reference, msgs, images, audios)
    ids, ours = _ours(engines("numpy"), msgs)
    assert ids == ref_ids
    ids_np = np.asarray(ids)
    assert (ids_np == mm.ids["image"]).sum() == 256 * kinds.count("i") + 256 * kinds.count("j")
    assert (ids_np == mm.ids["audio"]).sum() == 188 * (kinds.count("a") + kinds.count("b"))
    _close(ours, ref, what=f"numpy {kinds}")
    _same_argmax(ours, ref)


def test_native_backend_equals_transformers(mm, reference, processor, engines):
    msgs = _messages(mm, "ia")
    ref_ids, ref = _theirs(processor, reference, msgs, *_media_inputs(mm, "ia"))
    ids, ours = _ours(engines("cpu"), msgs)
    assert ids == ref_ids
    _close(ours, ref, what="cpu")
    _same_argmax(ours, ref)


def test_greedy_generation_equals_transformers(mm, reference, processor, engines):
    msgs = _messages(mm, "ai")
    images, audios = _media_inputs(mm, "ai")
    from PIL import Image as PILImage

    hf_msgs = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "audio"}, {"type": "image"},
                                            {"type": "text", "text": "What do you see and hear?"}]}]
    prompt = processor.apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=True)
    inp = processor(text=prompt, images=[PILImage.open(io.BytesIO(images[0]))], audio=audios, return_tensors="pt",
                    add_special_tokens=False)
    with torch.no_grad():
        out = reference.generate(**inp, max_new_tokens=8, do_sample=False)
    want = out[0, inp["input_ids"].shape[1]:].tolist()
    eng = engines("cpu")
    conv = eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=8)
    conv.send(msgs[0]["content"])
    got = conv.session.held_tokens[-len(want):]
    assert got == want


# ----------------------------------------------------------------------------- audio length

def test_long_audio_is_split_into_30_second_clips(mm, engines):
    """65 s of audio: three clips (30 + 30 + 5 s), each its own <start_of_audio> block whose
    rows are that clip's encoding alone."""
    from edgelm.runtime import media

    eng = engines("numpy")
    long = wav_bytes(65.0, 200, seed=3)
    enc = media.encode_audio(eng, long)
    assert len(enc) == 3 and all(e.values.shape == (188, eng.config.hidden_size) for e in enc)
    x = wav_samples(long)
    tail = io.BytesIO()
    with wave.open(tail, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((x[60 * SR:] * 32768).astype("<i2").tobytes())
    alone = media.encode_audio(eng, tail.getvalue())
    np.testing.assert_allclose(enc[2].values, alone[0].values, rtol=0, atol=1e-5)
    ids, spans = render_chat_spans(eng, [{"role": "user", "content": ["Summarise", Audio(long)]}])
    assert ids.count(mm.ids["boa"]) == 3 and ids.count(mm.ids["eoa"]) == 3 and len(spans) == 3
    # a 5 s clip fills 5 * 6.25 rows; the rest are the padding embedding
    pad = enc[2].values[-1]
    assert not np.allclose(enc[2].values[30], pad) and np.allclose(enc[2].values[33:], pad)


# ----------------------------------------------------------------------------- bad input

def test_text_only_bundle_refuses_media_clearly(mm, engines):
    eng = engines("numpy", mm.text)
    with Bundle(mm.text) as b:
        assert b.config.get("vision") is None and b.config.get("audio") is None
        assert not any(n.startswith(("v.", "a.", "mm.")) for n in b.tensor_names())
    conv = eng.create_conversation()
    for part, word in ((Image(mm.media / "a.png"), "image"), (Audio(mm.media / "a.wav"), "audio")):
        with pytest.raises(BadInputError, match=rf"message\[1\]: this bundle \(text.edgelm\) has no {word} encoder"):
            conv.send(["Hi", part])
    assert conv.messages == [] and conv.session.n_tokens == 0
    proc = run_cli("run", "-m", mm.text, "--image", mm.media / "a.png", "Describe", "-n", "2")
    assert_clean_error(proc, "has no image encoder")


def _truncated_png() -> bytes:
    data = png_bytes(50, 50, 3)
    return data[: len(data) // 2]


@pytest.mark.parametrize("part,needle", [
    (Image(b"not an image at all"), "not an image Pillow can read"),
    (Image(_truncated_png()), "corrupt or truncated image"),
    (Image(b""), "empty"),
    (Image("/nonexistent/cat.png"), "cannot read the image file"),
    (Image("https://example.com/cat.png"), "remote URL"),
    (Image("data:image/png;base64,@@@"), "not valid base64"),
    (Audio(b"RIFF\x00\x00\x00\x00WAVEjunk"), "corrupt or truncated WAV"),
    (Audio(wav_bytes(0.0)), "no samples"),
    (Audio(b""), "empty"),
    (Audio(b"\x00\x01\x02" * 100), "audio"),
    (Audio(wav_bytes(0.001)), "too short"),
])
def test_bad_media_are_clear_errors_that_change_nothing(mm, engines, part, needle):
    eng = engines("numpy")
    conv = eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=2)
    conv.send("Hello")
    before = (list(conv.messages), list(conv.session.tokens), conv._held_text)
    with pytest.raises(BadInputError, match=needle) as e:
        conv.send(["Look", part])
    assert str(e.value).startswith(("message[1]", "/nonexistent/cat.png"))
    assert (list(conv.messages), list(conv.session.tokens), conv._held_text) == before


def test_more_media_than_the_context_holds_is_a_clear_error(mm, engines):
    eng = Engine(mm.full, backend="numpy", max_tokens=600, kv_dtype="f32")
    try:
        conv = eng.create_conversation()
        img = Image(mm.media / "a.png")
        with pytest.raises(CapacityError, match="803 prompt tokens .* capacity is 600"):
            conv.send(["Compare", img, img, img], max_new_tokens=8)
        assert conv.messages == [] and conv.session.n_tokens == 0
    finally:
        eng.close()


# ----------------------------------------------------------------------------- surfaces

def test_python_conversation_keeps_media_across_turns(mm, engines):
    """A second turn reuses the first turn's KV (the image's rows included)."""
    eng = engines("cpu")
    conv = eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=3)
    conv.send([Text("Describe"), Image(mm.media / "a.png")])
    first = conv.last_prefill_tokens
    conv.send("And again?")
    assert first > 256 and conv.last_prefill_tokens < 40


def test_cli_run_with_image_and_audio(mm):
    proc = run_cli("run", "-m", mm.full, "--image", mm.media / "a.png", "--audio", mm.media / "a.wav",
                   "Describe", "-n", "3", "--temperature", "0", "--backend", "numpy")
    assert proc.returncode == 0, proc.stderr
    assert "prompt tokens" in proc.stderr
    n = int(proc.stderr.split("[")[1].split(" prompt tokens")[0])
    assert n > 256 + 188
    proc = run_cli("run", "-m", mm.full, "--image", mm.media / "a.wav", "Describe", "-n", "2")
    assert_clean_error(proc, "a.wav", "not an image")


def test_cli_chat_attaches_media(mm):
    script = f"/image {mm.media / 'a.png'}\n/audio {mm.media / 'a.wav'}\nWhat is it?\n/image /nope.png\n"
    proc = run_cli("chat", "-m", mm.full, "-n", "2", "--temperature", "0", input=script)
    assert proc.returncode == 0, proc.stderr
    assert "[image a.png attached to your next message]" in proc.stderr
    assert "[audio a.wav attached to your next message]" in proc.stderr
    assert "/nope.png: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_takes_image_and_audio_parts(mm, engines):
    import httpx

    from edgelm.server import BackgroundServer, create_app

    eng = engines("cpu")
    png = base64.b64encode((mm.media / "a.png").read_bytes()).decode()
    wav = base64.b64encode((mm.media / "a.wav").read_bytes()).decode()
    content = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
               {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
               {"type": "text", "text": "What do you see and hear?"}]
    conv = eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=4)
    want = conv.send(["Look:", Image(mm.media / "a.png"), Audio(mm.media / "a.wav"), "What do you see and hear?"])
    local = [{"type": "image_url", "image_url": {"url": str(mm.media / "a.png")}}, {"type": "text", "text": "Hi"}]
    for allow in (False, True):
        # the serial worker, then the batched one (continuous batching admits prompts with soft rows too)
        app = create_app(eng, max_body_bytes=8 << 20, model_name="mm", allow_local_files=allow,
                         parallel=2 if allow else 1)
        with BackgroundServer(app) as srv:
            body = {"model": "mm", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                    "temperature": 0}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
            assert r.json()["usage"]["prompt_tokens"] > 256 + 188
            # the same request again reuses the cached prompt, soft rows included
            r2 = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
            assert r2.json()["choices"][0]["message"]["content"] == want
            # n choices of a prompt with soft rows (each prefills its own session)
            r3 = httpx.post(srv.url + "/v1/chat/completions", json={**body, "n": 2}, timeout=120)
            assert r3.status_code == 200, r3.text
            assert [c["message"]["content"] for c in r3.json()["choices"]] == [want, want]
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                           json={"model": "mm", "messages": [{"role": "user", "content": local}], "max_tokens": 2})
            if allow:
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 400 and "local file paths are not accepted" in r.json()["error"]["message"]
            for bad, needle in (
                ({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, "not an image"),
                ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "remote URL"),
                ({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, "not valid base64"),
                ({"type": "input_audio", "input_audio": {"data": wav, "format": "aiff"}}, "format must be one of"),
                ({"type": "input_audio", "input_audio": "x"}, "input_audio must be an object"),
            ):
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                               json={"model": "mm", "messages": [{"role": "user", "content": [bad]}], "max_tokens": 2})
                assert r.status_code == 400 and needle in r.json()["error"]["message"], (needle, r.text)
            # an assistant message cannot hold media
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content[1:2]},
                    {"role": "user", "content": "and?"}]
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={"model": "mm", "messages": msgs})
            assert r.status_code == 400 and "only user messages may hold images or audio" in r.json()["error"]["message"]


def test_convert_flags_and_inspect(mm, tmp_path):
    out = tmp_path / "vision-only.edgelm"
    proc = run_cli("convert", mm.dir, "-o", out, "--scheme", "int8", "--tower-scheme", "int8", "--no-audio")
    assert proc.returncode == 0, proc.stderr
    assert "dropped the audio tower on request" in proc.stdout
    with Bundle(out) as b:
        assert b.config["audio"] is None and b.config["vision"]["soft_tokens"] == 256
        assert b.config["vision"]["preprocess"]["size"] == {"height": g3n.MM_IMAGE_SIZE, "width": g3n.MM_IMAGE_SIZE}
        towers = [n for n in b.tensor_names() if n.startswith("v.")]
        assert towers and not any(n.startswith("a.") for n in b.tensor_names())
        assert {b.tensor_info(n)["scheme"] for n in towers if len(b.tensor_info(n)["shape"]) == 2} >= {"int8"}
        assert b.meta["quantization"]["tower_scheme"] == "int8"
    proc = run_cli("inspect", mm.full, "--no-tensors")
    assert proc.returncode == 0, proc.stderr
    assert "inputs      text + image (256 tokens per image" in proc.stdout
    assert "+ audio (188 tokens per clip of <= 30 s" in proc.stdout
    proc = run_cli("convert", mm.dir, "-o", tmp_path / "x.edgelm", "--tower-scheme", "int4-b32")
    assert proc.returncode != 0 and "int4-b32" in proc.stderr


def test_spoken_sentence_end_to_end(mm, reference, processor, engines, tmp_path):
    """Speech synthesized offline by espeak-ng (22.05 kHz, resampled) through the whole
    pipeline: the processor's ids and transformers' logits."""
    wav = espeak_wav(tmp_path / "speech.wav", "Please describe the picture in one sentence.")
    from edgelm.multimodal import load_audio

    msgs = [{"role": "user", "content": ["Listen:", Audio(wav)]}]
    ref_ids, ref = _theirs(processor, reference, msgs, audios=[load_audio(wav, sampling_rate=SR)[0]])
    ids, ours = _ours(engines("numpy"), msgs)
    assert ids == ref_ids
    _close(ours, ref, what="speech")


def test_matformer_slice_keeps_the_towers(mm, engines, tmp_path):
    """A MatFormer slice of a checkpoint with towers keeps them: the same soft rows."""
    from edgelm.convert.matformer import slice_source
    from edgelm.runtime import media

    out = tmp_path / "slice.edgelm"
    convert(slice_source(load_hf_source(mm.dir), "0-7:64"), out, scheme="fp32", tower_scheme="fp32", progress=False)
    eng = Engine(out, backend="numpy", max_tokens=1024, kv_dtype="f32")
    try:
        assert eng.config.num_layers == 8 and eng.config.vision is not None and eng.config.audio is not None
        png, wav = mm.media / "a.png", mm.media / "a.wav"
        full = engines("numpy")
        np.testing.assert_array_equal(media.encode_image(eng, png).values, media.encode_image(full, png).values)
        np.testing.assert_array_equal(media.encode_audio(eng, wav)[0].values, media.encode_audio(full, wav)[0].values)
    finally:
        eng.close()


def _bundle_rss_kib(path) -> int:
    """KiB of the bundle file's mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_towers_stay_in_the_mapped_file_until_used(mm, tmp_path):
    """Loading copies no tower weight: right after Engine() almost none of the bundle's tower
    pages are resident (they are file-backed views), and encoding an image reads them."""
    import shutil

    path = tmp_path / "cold.edgelm"
    shutil.copyfile(mm.full, path)
    fd = os.open(path, os.O_RDONLY)
    try:  # drop the copy's page cache, so residency says what this process touched
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with Bundle(path) as b:
        tower = sum(sum(p["size"] for p in b.tensor_info(n)["parts"].values())
                    for n in b.tensor_names() if n.startswith(("v.", "a.", "mm.")))
    assert tower > 8 << 20  # the tiny towers are ~23 MiB in fp32
    eng = Engine(path, backend="numpy", max_tokens=1024, kv_dtype="f32")
    try:
        loaded = _bundle_rss_kib(path) * 1024
        assert loaded < tower // 8, f"{loaded} bytes of the bundle resident after load (towers: {tower})"
        from edgelm.runtime import media

        media.encode_image(eng, mm.media / "a.png")
        assert _bundle_rss_kib(path) * 1024 > tower // 2  # the image tower's pages were read in use
    finally:
        eng.close()


def test_an_item_larger_than_the_cache_is_refused_before_the_towers_run(mm):
    """A 10-minute recording (20 clips, ~3,840 tokens) on a 1,024-token cache, or an image on
    a 200-token cache: a capacity error naming the input and the sizes, before any encoding."""
    from edgelm.runtime import media

    eng = Engine(mm.full, backend="numpy", max_tokens=1024, kv_dtype="f32")
    small = Engine(mm.full, backend="numpy", max_tokens=200, kv_dtype="f32")
    try:
        long = np.zeros(600 * SR, np.float32)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes(long.astype("<i2").tobytes())
        with pytest.raises(CapacityError, match=r"600.0 s of audio \(20 clips of at most 30 s\) needs about 3840"):
            media.encode_audio(eng, buf.getvalue(), "talk.wav")
        with pytest.raises(CapacityError, match=r"an image needs about 260 prompt tokens.*capacity of 200"):
            small.create_conversation().send(["Look", Image(mm.media / "a.png")])
    finally:
        eng.close()
        small.close()
