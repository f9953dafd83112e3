"""Field media: every codec of the release decoded and compared with an independent decoder
(the `ffmpeg` command), windowed decoding, and camera photos (EXIF orientation, colour modes,
reduced-size JPEG decoding)."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from biovita.errors import MediaError
from biovita.frontends.audio import AudioFrontEnd, load_clip, load_whole, read_audio
from biovita.frontends.codecs import AudioSource, open_audio

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                reason="the ffmpeg command (.ci/run installs Debian's package)")
ENCODE = {
    "mp3-cbr": ("mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
    "mp3-vbr": ("mp3", ["-c:a", "libmp3lame", "-q:a", "4"]),
    "mp3-id3": ("mp3", ["-c:a", "libmp3lame", "-b:a", "96k", "-id3v2_version", "3",
                        "-metadata", "title=Parus major, dawn chorus"]),
    "m4a-aac": ("m4a", ["-c:a", "aac", "-b:a", "128k"]),
    "ogg-vorbis": ("ogg", ["-c:a", "libvorbis"]),
    "opus": ("opus", ["-c:a", "libopus"]),
    "flac": ("flac", []),
    "wav-16": ("wav", ["-c:a", "pcm_s16le"]),
    "wav-24": ("wav", ["-c:a", "pcm_s24le"]),
    "wav-float": ("wav", ["-c:a", "pcm_f32le"]),
}


def _signal(sr: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * min(1500, sr / 8) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    x = x + 0.01 * rng.standard_normal(len(t))
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)], 1).astype(np.float32)


def _encode(tmp_path, name: str, sr: int, seconds: float, channels: int) -> bytes:
    ext, args = ENCODE[name]
    src = tmp_path / f"{name}-{sr}-{channels}.src.wav"
    sf.write(src, _signal(sr, seconds, channels), sr, subtype="FLOAT")
    out = tmp_path / f"{name}-{sr}-{channels}.{ext}"
    subprocess.run(["ffmpeg", "-y", "-v", "error", "-i", str(src), *args, str(out)], check=True)
    return out.read_bytes()


def _ffmpeg(data: bytes, tmp_path) -> tuple[np.ndarray, int]:
    """The independent decoder: the ffmpeg command, float32 samples."""
    path = tmp_path / "probe.bin"
    path.write_bytes(data)
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=channels,sample_rate", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, check=True).stdout.strip().split(",")
    sr, ch = int(probe[0]), int(probe[1])
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "f32le", "-c:a", "pcm_f32le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.float32).reshape(-1, ch).T, sr


@pytest.mark.parametrize("name, sr, channels", [
    ("mp3-cbr", 44100, 2), ("mp3-vbr", 22050, 1), ("mp3-id3", 32000, 2), ("m4a-aac", 48000, 2),
    ("m4a-aac", 22050, 1), ("ogg-vorbis", 44100, 2), ("opus", 48000, 2), ("opus", 16000, 1),
    ("flac", 96000, 2), ("flac", 8000, 1), ("wav-16", 8000, 1), ("wav-24", 44100, 6),
    ("wav-float", 96000, 2)])
def test_every_codec_decodes_as_ffmpeg_does(tmp_path, name, sr, channels):
    data = _encode(tmp_path, name, sr, 3.3, channels)
    got, got_sr = read_audio(data)
    ref, ref_sr = _ffmpeg(data, tmp_path)
    assert got_sr == ref_sr and got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5  # float rounding inside the decoders


def test_mp3_with_trailing_garbage_decodes_and_its_chatter_is_captured(tmp_path, capfd):
    data = _encode(tmp_path, "mp3-cbr", 44100, 3.3, 2)
    rng = np.random.default_rng(1)
    got, _ = read_audio(data + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    ref, _ = _ffmpeg(data, tmp_path)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
    middle = len(data) // 2
    with pytest.raises(MediaError) as e:  # garbage inside the stream: mpg123 gives up
        read_audio(data[:middle] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + data[middle:])
    assert e.value.reason == "undecodable"
    assert "Illegal Audio-MPEG-Header" in str(e.value)  # the decoder's note, in the reason's detail
    assert "Illegal Audio-MPEG-Header" not in capfd.readouterr().err  # not in the job's log


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"), (None, "missing_file"),
    (b"<!DOCTYPE html><html><head><title>404</title></head></html>", "html_page"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "undecodable"),  # a header cut short
])
def test_the_releases_failure_kinds_have_reasons(data, reason):
    with pytest.raises(MediaError) as e:
        read_audio(data)
    assert e.value.reason == reason


@pytest.mark.parametrize("name, sr", [("mp3-vbr", 44100), ("ogg-vorbis", 22050), ("flac", 32000),
                                      ("wav-16", 48000), ("opus", 48000), ("m4a-aac", 44100)])
def test_a_training_crop_decodes_only_its_window(tmp_path, monkeypatch, name, sr):
    """A random 10 s crop of a 90 s recording reads ~10 s (plus the resampler's and the
    codec's margins) and equals cropping the fully decoded clip: exactly for libsndfile's
    formats and Opus; AAC to within its noise substitution, whose generator depends on what
    was decoded before the window (measured |delta| <= 0.03 on this noisy test signal)."""
    data = _encode(tmp_path, name, sr, 90.0, 2)
    fe = AudioFrontEnd()
    read = AudioSource.read
    spans = []

    def spy(self, start=0, count=None):
        spans.append(count)
        return read(self, start, count)

    monkeypatch.setattr(AudioSource, "read", spy)
    for seed in range(3):
        spans.clear()
        got = load_clip(data, fe, "random", np.random.default_rng(seed))
        assert len(spans) == 1 and spans[0] is not None and spans[0] <= 10.2 * open_audio(data).sample_rate
        whole = read(open_audio(data))  # every channel, decoded from the start
        src = open_audio(data)
        want = load_whole(whole, src.sample_rate, fe, "random", np.random.default_rng(seed), src.frames)
        tol = 0.05 if name == "m4a-aac" else 1e-5
        assert np.abs(got - want).max() < tol and np.abs(got).max() > 0.05  # not silence


def _photo(w: int, h: int, seed: int = 0):
    """A camera-like photo: smooth shapes, texture and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([120 + 80 * np.sin(6 * xx + 2 * yy), 100 + 90 * np.cos(5 * yy), 80 + 60 * np.sin(9 * xx * yy)], -1)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _bytes(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_photos_come_upright_and_in_rgb_whatever_their_mode():
    from PIL import Image

    from biovita.frontends.image import read_image

    left_red = Image.new("RGB", (40, 20), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the camera was held upright
    upright = np.asarray(read_image(_bytes(left_red, "JPEG", exif=exif, quality=95)))
    assert upright.shape == (40, 20, 3)  # turned
    assert upright[2, 10, 0] > 200 and upright[37, 10, 2] > 200  # red on top, blue below
    cmyk = np.asarray(read_image(_bytes(Image.new("RGB", (16, 16), (200, 40, 30)).convert("CMYK"), "JPEG")))
    assert np.abs(cmyk[8, 8].astype(int) - (200, 40, 30)).max() < 12
    deep = Image.fromarray(np.full((8, 8), 40000, np.uint16))  # 16-bit greyscale
    assert tuple(np.asarray(read_image(_bytes(deep, "PNG")))[4, 4]) == (156, 156, 156)  # scaled, not clipped
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.info["transparency"] = 1  # palette entry 1 transparent: composited over white
    assert tuple(np.asarray(read_image(_bytes(pal, "PNG", transparency=1)))[4, 4]) == (255, 255, 255)
    grey = np.asarray(read_image(_bytes(Image.new("L", (8, 8), 77), "PNG")))
    assert grey.shape == (8, 8, 3) and (grey == 77).all()


def test_large_jpegs_decode_reduced_and_close_to_full_decoding():
    """A photo at least twice the model's input decodes at a reduced DCT scale: the pixels the
    model gets are within a few levels of decoding at full size and resizing (the option
    `reduced=False` keeps full decoding)."""
    from biovita.frontends.image import ImageFrontEnd, load_image, read_image

    fe = ImageFrontEnd(image_size=224)
    data = _bytes(_photo(3000, 2000), "JPEG", quality=92)
    assert read_image(data, reduce_to=224).size == (375, 250)  # 1/8: the largest keeping >= 224
    assert read_image(data, reduce_to=0).size == (3000, 2000)
    small = load_image(data, fe)
    full = load_image(data, fe, reduced=False)
    assert small.shape == full.shape == (3, 224, 224)
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 3.0
    tiny = _bytes(_photo(300, 200), "JPEG")  # less than twice 224: decoded whole
    assert read_image(tiny, reduce_to=224).size == (300, 200)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A small store of the realistic profile (short clips and photos, to stay quick)."""
    from biovita.data.synth_realistic import make_realistic

    root = tmp_path_factory.mktemp("realistic")
    return root, make_realistic(root, n_species=8, seed=1, clips=(1, 3), photos=(1, 2),
                                clip_seconds=(5, 40), megapixels=(1, 3))


def test_realistic_store_has_the_releases_formats_and_damage(realistic):
    from biovita.data.store import read_table
    from biovita.frontends.sniff import sniff

    root, manifest = realistic
    audio = read_table(root, "audio", ["id", "bytes", "format"]).to_pylist()
    kinds = {sniff(r["bytes"]) for r in audio if not r["id"].startswith("bad_")}
    assert {"mp3", "mp4"} <= kinds and kinds <= {"mp3", "mp4", "wav", "flac", "ogg"}
    assert manifest["corrupt"]["audio"] == {"html_page": 1, "undecodable": 1, "empty_file": 1}


def test_validate_and_convert_count_every_damaged_file_and_keep_the_rest(realistic, ray_local, tmp_path):
    """Each damaged file is skipped and counted by reason; every decodable one is kept (an MP3
    with junk after its stream among them)."""
    import csv

    from biovita.data.convert import convert_release
    from biovita.data.store import read_table
    from biovita.data.validate import validate_store
    from biovita.taxonomy import folder_name, species_key

    root, manifest = realistic
    ok, report = validate_store(str(root), echo=False)
    assert ok
    for table in ("audio", "image"):
        assert report[table]["reasons"] == manifest["corrupt"][table]
        assert report[table]["good"] == manifest[f"{table}_rows"] - sum(manifest["corrupt"][table].values())
    # the same media as the release ships them: a CSV, audio files, one folder per species
    rows = read_table(root, "audio").to_pylist()
    (tmp_path / "audio").mkdir()
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["download_url", "source", "recording_id", "file_name", "scientific_name",
                    "accepted_name", "class", "order", "family", "genus", "com"])
        for r in rows:
            name = f"{r['id']}.{r['format']}"
            (tmp_path / "audio" / name).write_bytes(r["bytes"])
            w.writerow(["", r["source"], r["recording_id"], name, r["scientific_name"], "", r["class"],
                        r["order"], r["family"], r["genus"], r["common_name"]])
    for r in read_table(root, "image").to_pylist():
        d = tmp_path / "images" / folder_name(species_key(r["scientific_name"], None))
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{r['id']}.jpg").write_bytes(r["bytes"])
    rep = convert_release(str(tmp_path / "metadata.csv"), str(tmp_path / "audio"), str(tmp_path / "images"),
                          str(tmp_path / "store"), workers=1)
    for table in ("audio", "image"):
        assert dict(rep.skipped[table]) == manifest["corrupt"][table]
        assert rep.written[table] == report[table]["good"]
