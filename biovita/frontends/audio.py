"""Audio front end: decode -> mono -> 48 kHz -> 10 s crop/pad -> CLAP log-mel.

Pure torch/torchaudio; decoding in `biovita.frontends.codecs` (libsndfile and PyAV). Ray Data
calls these from `biovita.data.decode`. The log-mel matches transformers'
`ClapFeatureExtractor` for the same settings (golden test in tests/test_audio.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from biovita.errors import MediaError
from biovita.frontends.codecs import open_audio

# File name extensions taken for recordings (everything else a file CLI gets is a photo).
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac"})


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


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (channels x samples float32, sample rate), the whole clip. Raises
    MediaError (see `biovita.frontends.codecs.open_audio` for the reasons)."""
    src = open_audio(data)
    return _checked(src.read()), src.sample_rate


def _checked(wave: np.ndarray) -> np.ndarray:
    if wave.size == 0:
        raise MediaError("no_samples")
    if not np.isfinite(wave).all():
        raise MediaError("non_finite")
    return wave


def to_mono(wave: np.ndarray) -> np.ndarray:
    """The mean of the channels. Decoders hand (samples, channels) frames transposed, where
    `mean(axis=0)` reduces a short strided axis: 7.6 ms for a 10 s stereo crop at 48 kHz
    against 0.23 ms for these adds (the same float32 sum, in the same order)."""
    if wave.ndim == 1:
        return wave
    if wave.shape[0] == 1:
        return wave[0]
    out = np.add(wave[0], wave[1], dtype=np.float32)
    for channel in wave[2:]:
        out += channel
    out /= np.float32(wave.shape[0])
    return out


class Resampler:
    """torchaudio's sinc resampler (the kernel of `torchaudio.transforms.Resample`), able to
    compute just the output span a crop keeps: a 10 s crop of a 30 s clip resamples 10 s, not 30.
    Each output block of `new` samples depends on a fixed input window, so the span is exactly
    what resampling the whole clip and slicing would give."""

    def __init__(self, orig: int, new: int):
        import torch
        import torchaudio

        t = torchaudio.transforms.Resample(orig, new)
        self.width = t.width
        self.orig, self.new = orig // t.gcd, new // t.gcd
        # torchaudio applies its (new', 1, 2 * width + orig') kernel as a strided conv1d; the
        # same products as one matmul of input frames give the output already interleaved.
        # For small ratios (16 -> 48 kHz: 3 outputs from 15 taps) that matmul is too thin to
        # run fast: `group` blocks share one frame through a block-diagonal kernel (zeros
        # elsewhere), 2-3x faster for 8-32 kHz input (measured), same sums.
        kernel = t.kernel[:, 0, :].T
        taps = kernel.shape[0]
        self.group = max(1, -(-48 // self.new))
        self.kernel = torch.zeros(taps + (self.group - 1) * self.orig, self.group * self.new)
        for j in range(self.group):
            rows, cols = j * self.orig, j * self.new
            self.kernel[rows : rows + taps, cols : cols + self.new] = kernel

    def length(self, n_in: int) -> int:
        """Length of the whole resampled signal (torchaudio's)."""
        return -(-self.new * n_in // self.orig)

    def _window(self, start: int, stop: int) -> tuple[int, int, int]:
        """(first output block, input window start, input window end) for outputs [start, stop)."""
        b0, b1 = start // self.new, -(-stop // self.new)  # output blocks covering the span
        b1 = b0 + -(-(b1 - b0) // self.group) * self.group  # whole groups of blocks
        return b0, b0 * self.orig - self.width, b1 * self.orig + self.width

    def span(self, start: int, count: int, n_in: int) -> tuple[int, int]:
        """The input samples [a, b) that outputs [start, start + count) of a clip of `n_in`
        samples depend on: what a windowed decode has to read."""
        stop = min(start + count, self.length(n_in))
        if stop <= start:
            return 0, 0
        _, lo, hi = self._window(start, stop)
        return max(lo, 0), min(hi, n_in)

    def __call__(self, x: np.ndarray, start: int = 0, count: int | None = None,
                 x_offset: int = 0, n_in: int | None = None) -> np.ndarray:
        """Samples [start, start + count) of the resampled clip; zeros past its end. `x` holds
        input samples [x_offset, x_offset + len(x)) of a clip of `n_in` samples (default: all
        of it), at least `span(start, count, n_in)`."""
        import torch

        n_in = x_offset + len(x) if n_in is None else n_in
        total = self.length(n_in)
        count = total - start if count is None else count
        out = np.zeros(count, np.float32)
        stop = min(start + count, total)
        if stop <= start:
            return out
        b0, lo, hi = self._window(start, stop)
        seg = np.zeros(hi - lo, np.float32)
        a, b = max(lo, x_offset, 0), min(hi, x_offset + len(x), n_in)
        seg[a - lo : b - lo] = x[a - x_offset : b - x_offset]
        with torch.no_grad():
            frames = torch.from_numpy(seg).unfold(0, self.kernel.shape[0], self.group * self.orig)
            y = (frames @ self.kernel).reshape(-1).numpy()  # (b1 - b0) blocks of new' samples
        first = start - b0 * self.new
        out[: stop - start] = y[first : first + stop - start]
        return out


@functools.lru_cache(maxsize=16)
def resampler(orig: int, new: int) -> Resampler:
    return Resampler(orig, new)


def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave.astype(np.float32, copy=False)
    return resampler(sr, target)(np.asarray(wave, dtype=np.float32))


def onset_start(wave: np.ndarray, sample_rate: int, threshold: float = 0.01, pre_s: float = 0.2) -> int:
    """Evaluation crop start: 0.2 s before the first sample above 1 % of the peak."""
    if wave.size == 0:
        return 0
    peak = max(float(wave.max()), -float(wave.min()))  # no |wave| copy of the whole clip
    if peak <= 0:
        return 0
    step = max(1, sample_rate)  # the onset is near the start: look a second at a time
    first = 0
    for lo in range(0, len(wave), step):
        above = np.flatnonzero(np.abs(wave[lo : lo + step]) > threshold * peak)
        if above.size:
            first = lo + int(above[0])
            break
    return max(0, first - int(pre_s * sample_rate))


def crop_start(length: int, n: int, mode: str, onset: int = 0,
               rng: np.random.Generator | None = None) -> int:
    """Start of an `n`-sample crop of a `length`-sample clip: random (train), at the onset
    (eval) or 0. A clip shorter than `n` starts at 0 (or its onset) and is zero-padded."""
    if mode == "random":
        rng = rng or np.random.default_rng()
        return int(rng.integers(0, length - n + 1)) if length > n else 0
    if mode == "onset":
        return min(onset, length - n) if length > n else onset
    if mode == "start":
        return 0
    raise ValueError(f"unknown crop mode {mode!r}")


def crop_or_pad(
    wave: np.ndarray, n: int, mode: str, sample_rate: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Exactly `n` samples of a clip already at the target rate (see `crop_start`)."""
    onset = onset_start(wave, sample_rate) if mode == "onset" else 0
    start = crop_start(len(wave), n, mode, onset, rng)
    out = np.zeros(n, dtype=np.float32)
    piece = wave[start : start + n]
    out[: len(piece)] = piece
    return out


class LogMel:
    """Batched log-mel (B x samples -> B x 1 x frames x mels), as CLAP's extractor computes it:
    centred STFT (Hann, reflect padding), power spectrum, mel filter bank, 10 log10(max(x, 1e-10)).

    Runs on the device its window and filter bank are on (`device`): decoders ship waveforms
    and the training worker (or an embedding actor) computes the log-mels of a whole batch
    on its GPU. On a CPU the clips go one at a time (a clip's spectrogram, 4 MB, stays in
    cache; a batch's does not); on another device the whole batch at once. Same math either
    way, in float32."""

    def __init__(self, fe: AudioFrontEnd, device=None):
        import torch
        import torchaudio

        slaney = fe.truncation != "fusion"
        self.fe = fe
        fb = torchaudio.functional.melscale_fbanks(
            n_freqs=fe.n_fft // 2 + 1, f_min=fe.f_min, f_max=fe.f_max, n_mels=fe.n_mels,
            sample_rate=fe.sample_rate, norm="slaney" if slaney else None,
            mel_scale="slaney" if slaney else "htk")
        # bins above f_max carry no mel weight: the power spectrum stops at the last used bin
        self.n_bins = int(fb.abs().sum(1).nonzero().max()) + 1
        self.device = torch.device(device or "cpu")
        self.fb = fb[: self.n_bins].contiguous().to(self.device)
        self.window = torch.hann_window(fe.n_fft, device=self.device)

    def _spectrogram(self, x):
        """(..., samples) float32 -> (..., frames, mels)."""
        import torch

        p = self.fe.n_fft // 2  # centred frames: reflect padding (3x cheaper here than stft's)
        x = torch.cat([x[..., 1 : p + 1].flip(-1), x, x[..., -p - 1 : -1].flip(-1)], -1)
        spec = torch.stft(x, self.fe.n_fft, self.fe.hop_length, win_length=self.fe.n_fft,
                          window=self.window, center=False, return_complex=True)
        spec = spec[..., : self.n_bins, :]
        power = spec.real.square() + spec.imag.square()  # |X|^2: no sqrt, no strided copies
        mel = power.transpose(-1, -2) @ self.fb  # frames x mels
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))

    def __call__(self, waves, batched: bool | None = None):
        """`waves`: one clip, a (B, samples) array or tensor (any float dtype, any device: it is
        moved to this one), or a list of clips of the same length. `batched`: the whole batch
        in one STFT (default: off a CPU)."""
        import torch

        if isinstance(waves, np.ndarray) and waves.ndim == 1:
            waves = [waves]
        if isinstance(waves, torch.Tensor):
            x = waves.to(self.device, torch.float32, non_blocking=True)
        else:
            x = torch.as_tensor(np.asarray(waves, dtype=np.float32), device=self.device)
        batched = self.device.type != "cpu" if batched is None else batched
        with torch.no_grad():
            mels = self._spectrogram(x) if batched else torch.stack([self._spectrogram(w) for w in x])
            return mels.unsqueeze(1).contiguous()


@functools.lru_cache(maxsize=4)
def log_mel(fe: AudioFrontEnd) -> LogMel:
    return LogMel(fe)


def load_clip(
    data: bytes, fe: AudioFrontEnd, mode: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Encoded bytes -> one fixed-length mono 48 kHz waveform. Raises MediaError.

    The crop is chosen on the resampled time axis (its length is known from the header,
    without decoding), and only the input it needs is decoded (seek, then read) and
    resampled: a 10 s crop of a 5-minute recording costs about what a 10 s recording does.
    The onset crop (evaluation) is found against the whole clip's peak, so it decodes the
    whole clip."""
    src = open_audio(data)
    n, sr = fe.clip_samples, src.sample_rate
    if mode == "onset":
        return load_whole(_checked(src.read()), sr, fe, mode, rng)
    if sr == fe.sample_rate:
        start = crop_start(src.frames, n, mode, 0, rng)
        a, b = start, min(start + n, src.frames)
    else:
        r = resampler(sr, fe.sample_rate)
        start = crop_start(r.length(src.frames), n, mode, 0, rng)
        a, b = r.span(start, n, src.frames)
    x = _checked(src.read(a, b - a)) if b > a else _checked(src.read(0, 0))
    if x.shape[1] < b - a:  # the stream ends before its header says: crop what is there
        return load_whole(_checked(src.read()), sr, fe, mode, np.random.default_rng([start]))
    mono = to_mono(x)
    if sr == fe.sample_rate:
        out = np.zeros(n, np.float32)
        out[: len(mono)] = mono
        return out
    return r(mono, start, n, x_offset=a, n_in=src.frames)


def load_whole(wave: np.ndarray, sr: int, fe: AudioFrontEnd, mode: str,
               rng: np.random.Generator | None = None, frames: int | None = None) -> np.ndarray:
    """The crop of a clip decoded whole (channels x samples at `sr`). `frames`: the length a
    random crop is drawn for (the container's, as `load_clip` draws it; default: the decoded
    length)."""
    mono, n = to_mono(wave), fe.clip_samples
    frames = len(mono) if frames is None else frames
    if sr == fe.sample_rate:
        onset = onset_start(mono, sr) if mode == "onset" else 0
        start = crop_start(frames, n, mode, onset, rng)
        out = np.zeros(n, np.float32)
        piece = mono[start:start + n]
        out[:len(piece)] = piece
        return out
    r = resampler(sr, fe.sample_rate)
    onset = onset_start(mono, sr) * r.new // r.orig if mode == "onset" else 0
    return r(mono, crop_start(r.length(frames), n, mode, onset, rng), n)
