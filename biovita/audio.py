"""Audio front end: decode -> mono -> 48 kHz -> 10 s crop/pad -> CLAP log-mel.

Pure torch/torchaudio + soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3); Ray Data
calls these from `biovita.data.pipeline`. The log-mel matches transformers'
`ClapFeatureExtractor` for the same settings (golden test in tests/test_audio.py).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np

from biovita.errors import MediaError


@dataclass(frozen=True)
class AudioFrontEnd:
    """CLAP HTS-AT front-end settings. Build from the checkpoint's preprocessor config."""

    sample_rate: int = 48_000
    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 480
    f_min: float = 50.0
    f_max: float = 14_000.0
    clip_seconds: float = 10.0
    # ClapFeatureExtractor uses a Slaney filter bank for `rand_trunc` and an HTK one for `fusion`.
    truncation: str = "rand_trunc"

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, clip_seconds: float | None = None) -> "AudioFrontEnd":
        return cls(
            sample_rate=int(cfg.get("sampling_rate", 48_000)),
            n_mels=int(cfg.get("feature_size", 64)),
            n_fft=int(cfg.get("fft_window_size", 1024)),
            hop_length=int(cfg.get("hop_length", 480)),
            f_min=float(cfg.get("frequency_min", 0.0)),
            f_max=float(cfg.get("frequency_max", 14_000)),
            clip_seconds=float(clip_seconds or cfg.get("max_length_s", 10)),
            truncation=str(cfg.get("truncation", "fusion")),
        )

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def n_frames(self) -> int:
        return self.clip_samples // self.hop_length + 1


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (channels x samples float32, sample rate). Raises MediaError."""
    import soundfile as sf

    if data is None or len(data) == 0:
        raise MediaError("empty_file")
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types; all mean "cannot decode"
        raise MediaError("undecodable", str(e)[:200]) from None
    if wave.size == 0 or sr <= 0:
        raise MediaError("no_samples")
    if not np.isfinite(wave).all():
        raise MediaError("non_finite")
    return np.ascontiguousarray(wave.T), int(sr)


def to_mono(wave: np.ndarray) -> np.ndarray:
    return wave.mean(axis=0) if wave.ndim == 2 else wave


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave.astype(np.float32, copy=False)
    import torch

    with torch.no_grad():
        out = _resampler(sr, target)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return out.numpy()


def onset_start(wave: np.ndarray, sample_rate: int, threshold: float = 0.01, pre_s: float = 0.2) -> int:
    """Evaluation crop start: 0.2 s before the first sample above 1 % of the peak."""
    mag = np.abs(wave)
    peak = float(mag.max()) if mag.size else 0.0
    if peak <= 0:
        return 0
    first = int(np.argmax(mag > threshold * peak))
    return max(0, first - int(pre_s * sample_rate))


def crop_or_pad(
    wave: np.ndarray, n: int, mode: str, sample_rate: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Exactly `n` samples: random crop (train) or onset crop (eval); zero-pad when short."""
    if len(wave) > n:
        if mode == "random":
            rng = rng or np.random.default_rng()
            start = int(rng.integers(0, len(wave) - n + 1))
        elif mode == "onset":
            start = min(onset_start(wave, sample_rate), len(wave) - n)
        elif mode == "start":
            start = 0
        else:
            raise ValueError(f"unknown crop mode {mode!r}")
        return wave[start : start + n]
    if mode == "onset":
        wave = wave[onset_start(wave, sample_rate) :]
    out = np.zeros(n, dtype=np.float32)
    out[: len(wave)] = wave
    return out


class LogMel:
    """Batched log-mel (B x samples -> B x 1 x frames x mels), as CLAP's extractor computes it:
    centred STFT (Hann, reflect padding), power spectrum, mel filter bank, 10 log10(max(x, 1e-10))."""

    def __init__(self, fe: AudioFrontEnd):
        import torch
        import torchaudio

        slaney = fe.truncation != "fusion"
        self.fe = fe
        self.window = torch.hann_window(fe.n_fft)
        self.fb = torchaudio.functional.melscale_fbanks(
            n_freqs=fe.n_fft // 2 + 1, f_min=fe.f_min, f_max=fe.f_max, n_mels=fe.n_mels,
            sample_rate=fe.sample_rate, norm="slaney" if slaney else None,
            mel_scale="slaney" if slaney else "htk")

    def _one(self, x):
        import torch

        spec = torch.stft(x, self.fe.n_fft, self.fe.hop_length, win_length=self.fe.n_fft,
                          window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # |X|^2: no sqrt, no strided copies
        mel = power.transpose(-1, -2) @ self.fb  # frames x mels
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))

    def __call__(self, waves: np.ndarray):
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(waves, dtype=np.float32))
            if x.ndim == 1:
                x = x[None]
            # one clip at a time: a clip's spectrogram (4 MB) stays in cache, a batch's does not
            return torch.stack([self._one(x[i]) for i in range(x.shape[0])]).unsqueeze(1).contiguous()


@functools.lru_cache(maxsize=4)
def log_mel(fe: AudioFrontEnd) -> LogMel:
    return LogMel(fe)


def load_clip(
    data: bytes, fe: AudioFrontEnd, mode: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Encoded bytes -> one fixed-length mono 48 kHz waveform. Raises MediaError."""
    wave, sr = decode_audio(data)
    mono = resample(to_mono(wave), sr, fe.sample_rate)
    if not np.isfinite(mono).all():
        raise MediaError("non_finite")
    return crop_or_pad(mono, fe.clip_samples, mode, fe.sample_rate, rng)
