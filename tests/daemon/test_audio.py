"""Audio sources: WAV on the media clock, the capture-clock buffer, under-runs, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from polymorphd.daemon.audio import AudioBuffer, AudioFeed, AudioSource
from polymorphd.models.core.errors import ConfigError, MissingExtraError
from polymorphd.models.core.melspec import MelConfig, log_mel
from polymorphd.models.data.audio import write_wav

MEL = MelConfig()
SR = MEL.sample_rate


def tone_wav(path, seconds=2.0, tone_at=(1.0, 1.1), hz=2000.0):
    x = np.zeros(int(seconds * SR), dtype=np.float32)
    a, b = (int(t * SR) for t in tone_at)
    x[a:b] = 0.5 * np.sin(2 * np.pi * hz * np.arange(b - a) / SR)
    write_wav(path, x, SR)
    return path


def test_wav_source_gives_each_frame_the_window_ending_at_it(tmp_path):
    src = AudioSource(f"wav:{tone_wav(tmp_path / 'a.wav')}", MEL, fps=10.0)
    src.start()
    # frame 10 covers [1.0, 1.1) s: its window ends at 1.1 s and holds the tone in its last 1600 samples
    w = src.window(10, ts_ns=0)
    assert (w[-1600:] ** 2).mean() > 0.1 and (w[:-1600] ** 2).mean() < 1e-6
    assert (src.window(9, 0) ** 2).mean() < 1e-6
    assert np.allclose(src.mel_window(10, 0)[0], log_mel(w, MEL))
    assert src.stats() == {"uri": src.uri, "underruns": 0, "underrun_samples": 0}
    src.window(20, 0)  # ends at 2.1 s, the file at 2.0 s
    assert src.stats()["underruns"] == 1 and src.stats()["underrun_samples"] == 1600
    src.stop()


def test_capture_buffer_syncs_by_timestamp_and_counts_under_runs():
    buf = AudioBuffer(1000, seconds=1.0)
    t0 = 5_000_000_000
    # 10 blocks of 100 samples, block k holds the value k, the last sample of block k captured at t0 + (k+1)*0.1 s
    for k in range(10):
        buf.write(np.full(100, k, np.float32), t0 + (k + 1) * 100_000_000)
    w = buf.window(t0 + 500_000_000, 200)  # the 0.2 s before t0 + 0.5 s: blocks 3 and 4
    assert w[:100].tolist() == [3.0] * 100 and w[100:].tolist() == [4.0] * 100
    assert buf.underruns.windows == 0
    late = buf.window(t0 + 1_050_000_000, 100)  # 50 samples have not arrived yet
    assert late[:50].tolist() == [9.0] * 50 and late[50:].tolist() == [0.0] * 50
    assert (buf.underruns.windows, buf.underruns.samples) == (1, 50)
    empty = AudioBuffer(1000)
    assert not empty.window(t0, 10).any() and empty.underruns.windows == 1


def test_bad_audio_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="is not wav:PATH or alsa:DEVICE"):
        AudioSource("mic", MEL)
    with pytest.raises(ConfigError, match=r"wav:.*nope\.wav: .*cannot read WAV audio"):
        AudioSource(f"wav:{tmp_path / 'nope.wav'}", MEL, fps=10)
    write_wav(tmp_path / "8k.wav", np.zeros(800), 8000)
    with pytest.raises(ConfigError, match="is 8000 Hz; the bundle's audio front end expects 16000 Hz"):
        AudioSource(f"wav:{tmp_path / '8k.wav'}", MEL, fps=10)
    with pytest.raises(ConfigError, match="audio fps must be > 0"):
        AudioSource(f"wav:{tone_wav(tmp_path / 'a.wav')}", MEL, fps=0)


def test_alsa_without_the_audio_extra_says_what_to_install():
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        with pytest.raises(MissingExtraError, match=r"pip install 'polymorphd\[audio\]'.*libportaudio2"):
            AudioSource("alsa:hw:1,0", MEL)
    else:
        pytest.skip("sounddevice is installed here: the missing-extra path cannot be exercised")


def test_the_feed_falls_back_to_the_visual_exits_for_good_and_says_why(tmp_path):
    wav = f"wav:{tone_wav(tmp_path / 'a.wav')}"
    heard = SimpleNamespace(bundle_id="b-av", mel=MEL)
    deaf = SimpleNamespace(bundle_id="b-visual")  # a bundle without audio exits has no mel
    assert AudioFeed(None).status() is None  # no audio configured: status as without audio
    assert AudioFeed(None).window(10, 0, heard) is None

    no_exits = AudioFeed(wav, fps=10.0)
    no_exits.start(deaf)
    assert (
        no_exits.status()["state"] == "failed" and "b-visual has no audio exits" in no_exits.status()["error"]
    )

    feed = AudioFeed(wav, fps=10.0)
    feed.start(heard)
    assert feed.status() == {"state": "on", "uri": wav, "underruns": 0, "underrun_samples": 0}
    assert np.allclose(feed.window(10, 0, heard)[0], log_mel(feed.source.window(10, 0), MEL))
    assert feed.window(10, 0, deaf) is None  # a swapped-in visual bundle: visual exits, the source stays open
    assert feed.status()["state"] == "on"

    def broken(index, ts_ns):
        raise OSError("device vanished")

    feed.source.mel_window = broken
    assert feed.window(11, 0, heard) is None  # the frame goes on visually...
    assert feed.status() == {"state": "failed", "uri": wav, "error": "OSError: device vanished"}
    assert feed.window(12, 0, heard) is None  # ...and so do the next ones
    feed.stop()
