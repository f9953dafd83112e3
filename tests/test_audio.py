import io

import numpy as np
import pytest
import soundfile as sf

from biovita.frontends.audio import AudioFrontEnd, crop_or_pad, load_clip, log_mel, onset_start, read_audio
from biovita.errors import MediaError

# Golden tolerance against transformers' ClapFeatureExtractor: max |delta| in dB.
GOLDEN_TOL_DB = 1e-2


def _clip(sr=48_000, seconds=10.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 1500 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_log_mel_matches_clap_feature_extractor(truncation):
    """Golden test: our torchaudio front end == the checkpoint's ClapFeatureExtractor."""
    from transformers import ClapFeatureExtractor

    cfg = {"sampling_rate": 48000, "feature_size": 64, "fft_window_size": 1024, "hop_length": 480,
           "frequency_min": 50, "frequency_max": 14000, "max_length_s": 10, "truncation": truncation,
           "padding": "repeatpad"}
    fx = ClapFeatureExtractor(**{k: v for k, v in cfg.items() if k != "max_length_s"})
    fe = AudioFrontEnd.from_preprocessor_config(cfg)
    wave = _clip()
    ref = fx(wave, sampling_rate=48000, return_tensors="np")["input_features"][0, 0]
    ours = log_mel(fe)(wave)[0, 0].numpy()
    assert ours.shape == ref.shape == (1001, 64)
    assert np.abs(ours - ref).max() < GOLDEN_TOL_DB


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_log_mel_on_the_device_is_the_same_math(truncation):
    """The training worker's log-mel (a whole batch of float16 waveforms in one STFT, as on a
    GPU) against the CPU front end clip by clip on the same waveforms: within 0.01 dB."""
    import torch

    from biovita.frontends.audio import LogMel

    fe = AudioFrontEnd(truncation=truncation)
    waves = np.stack([_clip(seed=s) for s in range(3)] + [np.zeros(fe.clip_samples, np.float32)])
    shipped = torch.from_numpy(waves).half()  # what the decoders ship
    device = LogMel(fe, "cpu")(shipped, batched=True)
    reference = log_mel(fe)(list(shipped.float().numpy()))
    assert device.shape == reference.shape == (4, 1, 1001, 64) and device.dtype == torch.float32
    assert (device - reference).abs().max() < 0.01
    assert device[3].max() == pytest.approx(-100.0)  # silence: the floor, not NaN


def test_mel_flavour_matters():
    """The HTK (fusion) and Slaney (rand_trunc) banks differ: settings must come from the checkpoint."""
    wave = _clip()
    a = log_mel(AudioFrontEnd(truncation="rand_trunc"))(wave)
    b = log_mel(AudioFrontEnd(truncation="fusion"))(wave)
    assert (a - b).abs().max() > 1.0


@pytest.mark.parametrize("fmt,subtype,sr,channels", [
    ("WAV", "PCM_16", 16000, 1), ("FLAC", None, 44100, 2), ("OGG", "VORBIS", 32000, 1),
    ("MP3", "MPEG_LAYER_III", 22050, 2)])
def test_decode_formats_to_fixed_length(fmt, subtype, sr, channels):
    x = _clip(sr, 3.0)
    if channels == 2:
        x = np.stack([x, 0.5 * x], axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, **({"subtype": subtype} if subtype else {}))
    wave, got_sr = read_audio(buf.getvalue())
    assert got_sr == sr and wave.shape[0] == channels
    fe = AudioFrontEnd()
    clip = load_clip(buf.getvalue(), fe, "onset")
    assert clip.shape == (480_000,)
    assert np.abs(clip[300_000:]).max() == 0  # 3 s of audio, zero-padded (not looped)


def test_crop_modes():
    sr = 1000
    x = np.zeros(20 * sr, np.float32)
    x[5000:5100] = 1.0  # onset at 5 s
    assert onset_start(x, sr) == 5000 - 200
    onset = crop_or_pad(x, 10 * sr, "onset", sr)
    assert onset[200] == 1.0 and len(onset) == 10 * sr
    rng = np.random.default_rng(0)
    starts = {int(np.argmax(crop_or_pad(np.arange(20 * sr, dtype=np.float32), 10 * sr, "random", sr, rng) >= 0) or
                  crop_or_pad(np.arange(20 * sr, dtype=np.float32), 10 * sr, "random", sr, rng)[0]) for _ in range(5)}
    assert len(starts) > 1  # random crops move
    short = crop_or_pad(np.ones(300, np.float32), 1000, "random", sr)
    assert short[:300].sum() == 300 and short[300:].sum() == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"<html><body>404</body></html>", "html_page"),  # an error page saved as audio
    (bytes(range(256)) * 10, "undecodable"),
])
def test_bad_audio_raises_with_reason(data, reason):
    with pytest.raises(MediaError) as e:
        load_clip(data, AudioFrontEnd(), "onset")
    assert e.value.reason == reason


def test_non_finite_audio_is_rejected():
    buf = io.BytesIO()
    x = np.zeros(1000, np.float32)
    x[10] = np.inf
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(MediaError) as e:
        load_clip(buf.getvalue(), AudioFrontEnd(), "onset")
    assert e.value.reason == "non_finite"


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 24000, 32000, 44100])
def test_resampled_span_equals_slice_of_whole_resample(sr):
    """Only the kept span is resampled; it must equal torchaudio's whole-clip output sliced."""
    import torch
    import torchaudio

    from biovita.frontends.audio import resampler

    x = _clip(sr, 12.3, seed=sr)
    whole = torchaudio.functional.resample(torch.from_numpy(x), sr, 48000).numpy()
    r = resampler(sr, 48000)
    assert r.length(len(x)) == len(whole)
    for start, count in [(0, 48000), (12345, 480000), (len(whole) - 1000, 5000), (len(whole) + 10, 50)]:
        got = r(x, start, count)
        want = np.zeros(count, np.float32)
        piece = whole[start : start + count]
        want[: len(piece)] = piece
        assert got.shape == (count,)
        np.testing.assert_allclose(got, want, atol=1e-5)  # float32 sums in another order


def test_load_clip_equals_crop_of_whole_resampled_clip():
    """load_clip (crop first, resample the crop) == resample everything, then crop: the same
    random crop for the same generator, and the onset crop within a few samples."""
    import torch
    import torchaudio

    sr = 22050
    x = np.zeros(int(14 * sr), np.float32)
    x[int(3 * sr):] = _clip(sr, 11.0, seed=1)[: len(x) - int(3 * sr)]
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    fe = AudioFrontEnd()
    whole = torchaudio.functional.resample(torch.from_numpy(x), sr, 48000).numpy()
    got = load_clip(buf.getvalue(), fe, "random", np.random.default_rng(7))
    want = crop_or_pad(whole, fe.clip_samples, "random", 48000, np.random.default_rng(7))
    np.testing.assert_allclose(got, want, atol=1e-5)
    onset = load_clip(buf.getvalue(), fe, "onset")
    start = onset_start(whole, 48000)
    assert any(np.allclose(onset, whole[start + d : start + d + fe.clip_samples], atol=1e-5)
               for d in range(-3, 4))


def test_front_end_read_from_a_checkpoint_folder_matches_its_extractor(tmp_path):
    """The log-mel settings come from the CLAP checkpoint's own preprocessor_config.json: a
    folder with non-default settings (fmin 50, rand_trunc, fmax 12 kHz) gives features equal
    to that folder's ClapFeatureExtractor."""
    from transformers import ClapFeatureExtractor

    from biovita.models.factory import audio_front_end

    ClapFeatureExtractor(frequency_min=50, frequency_max=12000, truncation="rand_trunc").save_pretrained(tmp_path)
    fe = audio_front_end(str(tmp_path))
    assert (fe.f_min, fe.f_max, fe.truncation) == (50, 12000, "rand_trunc")
    wave = _clip()
    ref = ClapFeatureExtractor.from_pretrained(tmp_path)(wave, sampling_rate=48000, return_tensors="np")
    ours = log_mel(fe)(wave)[0, 0].numpy()
    assert np.abs(ours - ref["input_features"][0, 0]).max() < GOLDEN_TOL_DB


def test_to_mono_is_the_channel_mean_of_transposed_frames():
    """Decoders hand (samples, channels) frames transposed; the mono mix is their exact mean
    (the same float32 sums as numpy's), for any channel count and for integer samples."""
    from biovita.frontends.audio import to_mono

    rng = np.random.default_rng(0)
    for channels in (2, 3, 6):
        frames = rng.standard_normal((4801, channels)).astype(np.float32)
        assert np.array_equal(to_mono(frames.T), frames.T.mean(axis=0))
    pcm = rng.integers(-2**15, 2**15, (2, 100)).astype(np.int16)
    assert to_mono(pcm).dtype == np.float32 and np.allclose(to_mono(pcm), pcm.mean(axis=0))
