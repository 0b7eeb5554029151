from __future__ import annotations

import numpy as np
import pytest

from polymorphd.models.core.melspec import MelConfig, log_mel, mel_filterbank


def test_a_tone_peaks_in_the_mel_band_that_holds_its_frequency():
    cfg = MelConfig()
    t = np.arange(cfg.samples) / cfg.sample_rate
    for hz in (300.0, 1000.0, 4000.0):
        m = log_mel(0.3 * np.sin(2 * np.pi * hz * t), cfg)
        assert m.shape == (cfg.n_mels, cfg.frames) and m.dtype == np.float32
        band = int(np.argmax(m.mean(axis=1)))
        fb = mel_filterbank(cfg)
        bin_of = round(hz * cfg.n_fft / cfg.sample_rate)
        assert band == int(np.argmax(fb[:, bin_of]))


def test_silence_is_the_floor_and_batches_equal_single_windows():
    cfg = MelConfig()
    assert np.allclose(log_mel(np.zeros(cfg.samples), cfg), np.log(1e-6), atol=1e-5)
    x = np.random.default_rng(0).standard_normal((3, cfg.samples)).astype(np.float32) * 0.1
    assert np.allclose(log_mel(x, cfg)[1], log_mel(x[1], cfg), atol=1e-5)


def test_bad_windows_and_configs_are_named():
    cfg = MelConfig()
    with pytest.raises(ValueError, match=f"has 100 samples; the mel front end expects {cfg.samples}"):
        log_mel(np.zeros(100), cfg)
    with pytest.raises(ValueError, match="patch 16x7 must divide the spectrogram 32x32"):
        MelConfig(patch_frames=7)
    with pytest.raises(ValueError, match="fmax"):
        MelConfig(fmax=9000.0)
    assert MelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MelConfig key"):
        MelConfig.from_dict({"bogus": 1})
