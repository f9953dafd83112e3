"""Decoding the release's audio, whole or a window of it.

libsndfile (soundfile) reads WAV, FLAC, Ogg Vorbis and MP3, and seeks in them sample-exactly;
PyAV (FFmpeg, in its wheel) reads what libsndfile cannot: M4A/AAC and Opus, which it was also
faster at here (60 s stereo 44.1 kHz, a 10 s window: libsndfile WAV 2.3 ms, FLAC 9.4, Vorbis
14.5, MP3 9.9, Opus 53.9; PyAV Opus 21.0, AAC 12.0). The format is sniffed from the bytes, not
taken from a file name. What a decoder prints about a damaged stream (mpg123's "Illegal
Audio-MPEG-Header" notes) is captured and becomes the skip reason's detail instead of
reaching the job's log.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from biovita.errors import MediaError
from biovita.frontends.sniff import AUDIO_KINDS, sniff

LIBSNDFILE = ("wav", "flac", "ogg", "mp3", "aiff", "sndfile")  # sndfile: read by libsndfile, unsniffed
PYAV = ("opus", "mp4")
PREROLL_S = 0.2  # decoded before a PyAV window: AAC and Opus need frames before it to converge


@contextlib.contextmanager
def captured_stderr():
    """Collect what C libraries write to file descriptor 2 meanwhile (libsndfile's mpg123
    notes); yields a list that holds the text afterwards."""
    text: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode("utf-8", "replace"))


@dataclass
class AudioSource:
    """An encoded clip opened for reading: its format, rate, length, and windows of it."""

    data: bytes
    kind: str
    sample_rate: int
    frames: int  # from the container's header: a truncated file may hold fewer
    channels: int

    def read(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """(channels, n) float32 samples [start, start + count) at the native rate (to the
        end with count None); fewer when the stream ends first."""
        try:
            if self.kind in LIBSNDFILE:
                return _sf_read(self, start, count)
            return _av_read(self.data, start, count)[0]
        except MediaError:
            raise
        except Exception as e:
            raise MediaError("undecodable", str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def _sf_read(src: AudioSource, start: int, count: int | None) -> np.ndarray:
    import soundfile as sf

    error = None
    with _chatter(src.kind) as notes:
        try:
            with sf.SoundFile(io.BytesIO(src.data)) as f:
                if start:
                    f.seek(start)
                x = f.read(-1 if count is None else count, dtype="float32", always_2d=True)
        except Exception as e:
            error = e
    if error is not None:  # (the notes are complete once the capture has ended)
        raise MediaError("undecodable", _detail(error, notes))
    return x.T


@contextlib.contextmanager
def _chatter(kind: str):
    """mpg123 talks on stderr; the other decoders do not."""
    if kind == "mp3":
        with captured_stderr() as notes:
            yield notes
    else:
        yield []


def _detail(e: Exception, notes: list[str]) -> str:
    said = " ".join(" ".join(notes).split())
    return (f"{e}; decoder: {said}" if said else str(e))[:300]


def _av_read(data: bytes, start: int = 0, count: int | None = None):
    """PyAV decoding placed by timestamps (exact after the pre-roll; AAC's noise substitution
    draws from a generator that depends on what was decoded before, so an AAC window can differ
    from the whole decode in noise-like bands)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        sr, tb = s.codec_context.sample_rate, s.time_base
        if start / sr - PREROLL_S > 0:
            c.seek(int((start / sr - PREROLL_S) / tb), stream=s, backward=True, any_frame=False)
        chunks, stop = [], None if count is None else start + count
        for frame in c.decode(s):
            first = round(frame.pts * tb * sr) if frame.pts is not None else (
                chunks[-1][0] + chunks[-1][1].shape[1] if chunks else 0)
            a = frame.to_ndarray()
            if not frame.format.is_planar:
                a = a.reshape(-1, len(frame.layout.channels)).T
            if a.dtype.kind == "i":
                a = a.astype(np.float32) / np.iinfo(a.dtype).max
            chunks.append((first, a.astype(np.float32, copy=False)))
            if stop is not None and first + a.shape[1] >= stop:
                break
    if not chunks:
        return np.zeros((1, 0), np.float32), sr
    end = max(o + a.shape[1] for o, a in chunks) if stop is None else stop
    end = min(end, max(o + a.shape[1] for o, a in chunks))
    out = np.zeros((chunks[0][1].shape[0], max(0, end - start)), np.float32)
    for o, a in chunks:
        lo, hi = max(o, start), min(o + a.shape[1], end)
        if hi > lo:
            out[:, lo - start:hi - start] = a[:, lo - o:hi - o]
    return out, sr


def open_audio(data: bytes | None) -> AudioSource:
    """Sniff and open encoded audio. Raises MediaError: missing_file, empty_file, html_page
    (an error page saved as audio), not_audio (another kind of file), undecodable."""
    if data is None:
        raise MediaError("missing_file")
    kind = sniff(data)
    if kind == "empty":
        raise MediaError("empty_file")
    if kind in ("html", "text"):
        raise MediaError("html_page" if kind == "html" else "not_audio", data[:60].decode("utf-8", "replace"))
    if kind not in AUDIO_KINDS and kind != "unknown":
        raise MediaError("not_audio", kind)
    if kind in LIBSNDFILE or kind == "unknown":
        import soundfile as sf

        error = None
        with _chatter("mp3" if kind in ("mp3", "unknown") else kind) as notes:
            try:
                info = sf.info(io.BytesIO(data))
            except Exception as e:
                error = e
        if error is None:
            return AudioSource(data, kind if kind != "unknown" else "sndfile", int(info.samplerate),
                               int(info.frames), int(info.channels))
        if kind != "unknown":
            raise MediaError("undecodable", _detail(error, notes))
    return _open_av(data, kind)


def _opus_pre_skip(data: bytes) -> int:
    """The samples an Opus decoder drops at the start (RFC 7845: OpusHead bytes 10-11)."""
    i = data.find(b"OpusHead", 0, 4096)
    return int.from_bytes(data[i + 10:i + 12], "little") if i >= 0 else 0


def _open_av(data: bytes, kind: str) -> AudioSource:
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.audio[0]
            sr = s.codec_context.sample_rate
            frames = int(s.duration * s.time_base * sr) if s.duration else int((c.duration or 0) * sr / 1e6)
            if kind == "opus":  # Ogg's duration counts the decoder's pre-skip, which it drops
                frames -= _opus_pre_skip(data)
            return AudioSource(data, "mp4" if kind == "unknown" else kind, sr, frames,
                               s.codec_context.channels)
    except Exception as e:
        raise MediaError("undecodable", str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
