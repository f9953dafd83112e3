"""Media of the synthetic dataset: each species' calls and looks, drawn from its taxonomy
(see `biovita.data.synth`), encoded as the files a real store holds, and the corrupt files
the store plants on purpose."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np

# genus colour (RGB), index by genus
PALETTE = ((200, 40, 40), (230, 160, 30), (40, 90, 220), (110, 130, 40), (235, 235, 215),
            (20, 40, 140), (170, 90, 40), (30, 160, 110), (250, 60, 90), (100, 110, 130),
            (240, 200, 40), (140, 60, 200), (150, 60, 20), (30, 30, 30), (20, 150, 160),
            (250, 130, 110))
HABITATS = ("forest", "grassland", "wetland", "desert", "marine", "urban")

@dataclass(frozen=True)
class Species:
    species_id: int
    klass: str
    order: str
    family: str
    genus: str
    scientific_name: str
    common_name: str
    class_idx: int
    family_idx: int  # within class
    genus_idx: int  # global
    genus_in_family: int
    species_in_genus: int
    seen: bool
    buzz: int = 0  # 1: a high buzz in every syllable: audible only
    mark: int = 0  # 0 none, 1 a bright spot: visible only
    secret: int = 0  # shapes nothing

    def hidden(self) -> dict[str, int]:
        return {"buzz": self.buzz, "mark": self.mark, "secret": self.secret}

    def taxonomy(self) -> dict[str, str]:
        return {"class": self.klass, "order": self.order, "family": self.family,
                "genus": self.genus, "scientific_name": self.scientific_name,
                "common_name": self.common_name}


# ----------------------------------------------------------------------------- audio


def synth_call(sp: Species, rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """One clip of the species' call, repeated phrases at the genus rhythm, with noise."""
    n = int(seconds * sr)
    t_all = np.arange(n) / sr
    out = np.zeros(n, dtype=np.float64)
    # family: frequency band (per class base band, second family an octave-ish up)
    base = {0: 2200.0, 1: 350.0, 2: 4200.0, 3: 220.0}[sp.class_idx]
    f0 = base * (1.0 if sp.family_idx == 0 else 1.7)
    # species: fine pitch
    f0 *= 1.0 + 0.12 * sp.species_in_genus
    # genus: rhythm (syllables per second) and modulation depth
    rate = 3.0 if sp.genus_in_family == 0 else 6.5
    mod = 0.15 if sp.genus_in_family == 0 else 0.35
    # species: syllable pattern within a phrase (durations in units of 1/rate)
    pattern = ((1.0, 1.0, 1.0), (0.5, 0.5, 1.6), (1.6, 0.5), (0.4, 0.4, 0.4, 0.4))[
        sp.species_in_genus % 4]
    onset = rng.uniform(0.0, 1.5)
    pos = onset
    f0_clip = f0 * rng.uniform(0.985, 1.015)
    while pos < seconds:
        for unit in pattern:
            dur = 0.8 * unit / rate
            i0, i1 = int(pos * sr), min(n, int((pos + dur) * sr))
            if i0 >= n:
                break
            tt = t_all[i0:i1] - pos
            env = np.sin(np.pi * np.clip(tt / dur, 0, 1)) ** 2
            if sp.class_idx == 0:  # bird: FM whistle / trill
                inst = f0_clip * (1 + mod * np.sin(2 * np.pi * (8 + 10 * mod) * tt) + 0.2 * tt / dur)
                phase = 2 * np.pi * np.cumsum(inst) / sr
                sig = np.sin(phase)
            elif sp.class_idx == 1:  # frog: pulsed harmonic croak
                pulses = (np.sin(2 * np.pi * (25 + 40 * mod) * tt) > 0).astype(float)
                sig = sum(np.sin(2 * np.pi * f0_clip * h * tt) / h for h in (1, 2, 3, 4)) * pulses
            elif sp.class_idx == 2:  # insect: broadband pulse train around the band
                noise = rng.standard_normal(len(tt))
                carrier = np.sin(2 * np.pi * f0_clip * tt)
                pulses = (np.sin(2 * np.pi * (40 + 60 * mod) * tt) > 0.3).astype(float)
                sig = (0.6 * carrier + 0.4 * noise * carrier) * pulses
            else:  # mammal: low harmonic call with vibrato
                vib = 1 + 0.5 * mod * np.sin(2 * np.pi * 5 * tt)
                phase = 2 * np.pi * np.cumsum(f0_clip * vib) / sr
                sig = sum(np.sin(h * phase) * (0.8 ** h) for h in range(1, 7))
            if sp.buzz:  # a hidden attribute, heard only: a 4.5-6 kHz band in each syllable
                sig = sig + 0.6 * sum(np.sin(2 * np.pi * f * tt + ph) for f, ph in zip(
                    np.linspace(4500, 6000, 7), rng.uniform(0, 2 * np.pi, 7))) / 7 ** 0.5
            out[i0:i1] += env * sig
            pos += unit / rate
        pos += rng.uniform(0.4, 1.0)  # gap between phrases
    peak = np.abs(out).max() or 1.0
    out = out / peak * rng.uniform(0.2, 0.9)
    noise_level = rng.uniform(0.003, 0.03)
    out += noise_level * rng.standard_normal(n)
    return out.astype(np.float32)


def audio_bytes(wave: np.ndarray, sr: int, fmt: str) -> bytes:
    """A clip encoded as a recorder or a website would: WAV, FLAC, Ogg Vorbis, MP3, M4A/AAC."""
    import soundfile as sf

    if fmt == "m4a":
        return _aac_bytes(wave, sr)
    buf = io.BytesIO()
    kw = {"wav": dict(format="WAV", subtype="PCM_16"), "flac": dict(format="FLAC"),
          "ogg": dict(format="OGG", subtype="VORBIS"),
          "mp3": dict(format="MP3", subtype="MPEG_LAYER_III")}[fmt]
    x = np.clip(wave, -1, 1)
    channels = 1 if x.ndim == 1 else x.shape[1]
    with sf.SoundFile(buf, "w", sr, channels, **kw) as f:
        for i in range(0, len(x), 1 << 16):  # libsndfile's Vorbis encoder crashed on one
            f.write(x[i:i + (1 << 16)])      # 60 s stereo write (2.9 M frames)
    return buf.getvalue()


def _aac_bytes(wave: np.ndarray, sr: int) -> bytes:
    import av

    x = np.clip(np.atleast_2d(wave.T if wave.ndim == 2 else wave), -1, 1).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=sr, layout="stereo" if x.shape[0] == 2 else "mono")
        size = s.codec_context.frame_size or 1024  # the encoder takes whole frames
        for i in range(0, x.shape[1], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + size]), format="fltp",
                                               layout=s.layout)
            frame.sample_rate, frame.pts = sr, i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return buf.getvalue()


# ----------------------------------------------------------------------------- images


def _background(sp: Species, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    habitat = (sp.family_idx + 2 * sp.class_idx) % 6
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    colours = {
        0: ((20, 70, 20), (60, 120, 50)),  # forest: dark greens, vertical trunks
        1: ((120, 170, 60), (190, 210, 120)),  # grassland
        2: ((40, 80, 90), (90, 140, 130)),  # wetland
        3: ((210, 180, 120), (240, 215, 160)),  # desert
        4: ((10, 40, 110), (40, 110, 190)),  # marine
        5: ((90, 90, 95), (160, 160, 165)),  # urban
    }[habitat]
    a, b = np.array(colours[0], float), np.array(colours[1], float)
    grad = yy[..., None]
    img = a * (1 - grad) + b * grad
    phase = rng.uniform(0, 2 * np.pi)
    tex = {0: np.sin(xx * 60 + phase) > 0.7, 1: np.sin(xx * 30 + yy * 90 + phase) > 0.8,
           2: np.sin(yy * 50 + np.sin(xx * 20) + phase) > 0.6, 3: np.sin(yy * 15 + xx * 5 + phase) > 0.9,
           4: np.sin(yy * 35 + np.sin(xx * 12) * 2 + phase) > 0.7,
           5: (np.sin(xx * 40 + phase) > 0.9) | (np.sin(yy * 40) > 0.9)}[habitat]
    img[tex] *= 0.75
    return img


def synth_image(sp: Species, rng: np.random.Generator) -> "object":
    from PIL import Image, ImageDraw

    w, h = int(rng.integers(96, 257)), int(rng.integers(96, 257))
    bg = _background(sp, rng, w, h)
    S = 256  # draw the animal on a square canvas, then rotate/scale/paste
    canvas = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    colour = PALETTE[sp.genus_idx % len(PALETTE)]
    col = tuple(int(np.clip(c * rng.uniform(0.9, 1.1), 0, 255)) for c in colour) + (255,)
    if sp.class_idx == 0:  # bird: oval body, round head, beak, tail
        body = (60, 100, 190, 170); d.ellipse(body, fill=col)
        d.ellipse((160, 70, 215, 125), fill=col)
        d.polygon([(213, 92), (245, 100), (213, 108)], fill=(240, 200, 0, 255))
        d.polygon([(65, 130), (15, 110), (20, 160)], fill=col)
    elif sp.class_idx == 1:  # frog: squat wide body, splayed legs, eyes
        body = (50, 110, 206, 190); d.ellipse(body, fill=col)
        for x0 in (40, 180):
            d.rectangle((x0, 170, x0 + 36, 200), fill=col)
        for x0 in (85, 150):
            d.ellipse((x0, 95, x0 + 24, 119), fill=(250, 250, 250, 255))
    elif sp.class_idx == 2:  # insect: three segments + legs + antennae
        for i, x0 in enumerate((40, 105, 160)):
            d.ellipse((x0, 100, x0 + 65, 160), fill=col)
        body = (40, 100, 225, 160)
        for x in (110, 135, 160):
            d.line((x, 100, x - 20, 60), fill=(20, 20, 20, 255), width=5)
            d.line((x, 160, x - 20, 200), fill=(20, 20, 20, 255), width=5)
        d.line((215, 115, 250, 70), fill=(20, 20, 20, 255), width=4)
    else:  # mammal (bat): wide wings, round body, ears
        d.polygon([(128, 110), (10, 70), (40, 150), (128, 160)], fill=col)
        d.polygon([(128, 110), (246, 70), (216, 150), (128, 160)], fill=col)
        body = (95, 95, 161, 185); d.ellipse(body, fill=col)
        d.polygon([(105, 100), (112, 60), (125, 98)], fill=col)
        d.polygon([(131, 98), (144, 60), (151, 100)], fill=col)
    # species: pattern clipped to the body
    mask = Image.new("L", (S, S), 0)
    md = ImageDraw.Draw(mask)
    md.ellipse(body, fill=255)
    pat = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    pd = ImageDraw.Draw(pat)
    dark = (15, 15, 15, 255) if sum(colour) > 300 else (245, 245, 245, 255)
    kind = sp.species_in_genus % 4
    if kind == 0:  # vertical stripes
        for x in range(body[0], body[2], 22):
            pd.rectangle((x, 0, x + 9, S), fill=dark)
    elif kind == 1:  # spots
        for x in range(body[0] + 8, body[2], 28):
            for y in range(body[1] + 8, body[3], 28):
                pd.ellipse((x, y, x + 14, y + 14), fill=dark)
    elif kind == 2:  # one thick horizontal band
        cy = (body[1] + body[3]) // 2
        pd.rectangle((0, cy - 12, S, cy + 12), fill=dark)
    else:  # chequer
        for x in range(body[0], body[2], 20):
            for y in range(body[1], body[3], 20):
                if ((x - body[0]) // 20 + (y - body[1]) // 20) % 2 == 0:
                    pd.rectangle((x, y, x + 19, y + 19), fill=dark)
    canvas.paste(pat, (0, 0), Image.composite(pat, Image.new("RGBA", (S, S)), mask).getchannel("A"))
    if sp.mark:  # a hidden attribute, seen only: a bright spot on the body
        cx, cy = (body[0] + body[2]) // 2, (body[1] + body[3]) // 2
        d.ellipse((cx - 34, cy - 34, cx + 34, cy + 34), fill=(255, 240, 40, 255),
                  outline=(200, 0, 0, 255), width=6)
    # pose: rotation, mirror, scale, position
    animal = canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC)
    if rng.random() < 0.5:
        animal = animal.transpose(Image.FLIP_LEFT_RIGHT)
    side = int(min(w, h) * rng.uniform(0.65, 0.95))
    animal = animal.resize((side, side), Image.BICUBIC)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    img.paste(animal, (x0, y0), animal)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def image_bytes(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
             **({"quality": 90} if fmt != "png" else {}))
    return buf.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims 10^10 pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_audio(kind: str, rng: np.random.Generator, good: bytes) -> tuple[bytes, str]:
    if kind == "truncated":
        return good[:40], "wav"  # header cut: no decoder can recover it
    if kind == "random_bytes":
        return rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "flac"
    if kind == "html_as_mp3":
        return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>", "mp3"
    if kind == "zero_length":
        return b"", "ogg"
    if kind == "nan_samples":
        import soundfile as sf
        buf = io.BytesIO()
        x = np.full(8000, np.nan, dtype=np.float32)
        sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
        return buf.getvalue(), "wav"
    raise ValueError(kind)


def corrupt_image(kind: str, rng: np.random.Generator, good: bytes) -> tuple[bytes, str]:
    if kind == "truncated":
        return good[: min(60, len(good) // 4)], "jpeg"
    if kind == "random_bytes":
        return rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), "png"
    if kind == "zero_length":
        return b"", "webp"
    if kind == "decompression_bomb":
        return _png_bomb(), "png"
    raise ValueError(kind)
