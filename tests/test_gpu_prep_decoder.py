"""The device path's JPEG decoder (piqa_core.gpu_prep._decode): a failing batch is retried file by file,
files fall back to PIL, and a broken decoder (not bad files) is switched off once per process."""

from __future__ import annotations

import warnings

import pytest
import torch

import piqa_core.gpu_prep as gp
from piqa_core.stages import prepare_batch
from tests.corpus import astronaut_jpeg_bytes
from tests.test_gpu_prep import bundle, diff  # noqa: F401 (bundle: a fixture)


def test_nvjpeg_failure_retries_one_by_one_then_falls_back_to_pil(bundle, monkeypatch):
    cfg = bundle.config
    items = [astronaut_jpeg_bytes(90), astronaut_jpeg_bytes(80, 600, 400), astronaut_jpeg_bytes(70, 400, 560)]
    real, calls = gp.decode_jpeg, []

    def flaky(data, **kw):
        calls.append(len(data))
        if any(bytes(t.numpy()) == items[1] for t in data):
            raise RuntimeError("nvjpeg: simulated failure")
        return real(data, **kw)

    monkeypatch.setattr(gp, "decode_jpeg", flaky)
    monkeypatch.setattr(gp, "_decoder_broken", {})
    got = gp.prepare_batch_on_device(items, cfg, None, "cpu")
    assert calls == [3, 1, 1, 1]  # one batched try, then each item alone
    ref = prepare_batch(items, cfg, None)
    assert list(got["status"]) == ["ok"] * 3
    for k in ("whole", "face", "patches"):
        assert diff(got[k].numpy(), ref[k]).max() <= 1
    # One bad file is not a broken decoder: the next batch is decoded by it again.
    assert gp.decoder_broken("cpu") is None
    gp.prepare_batch_on_device(items[:1], cfg, None, "cpu")
    assert calls == [3, 1, 1, 1, 1]


def test_broken_decoder_is_switched_off_once_per_process(bundle, monkeypatch):
    """The batch and every single-file retry fail alike: warn once, then PIL for every later batch."""
    cfg = bundle.config
    items = [astronaut_jpeg_bytes(90), astronaut_jpeg_bytes(80, 600, 400), astronaut_jpeg_bytes(70, 400, 560)]
    calls = []

    def broken(data, **kw):
        calls.append(len(data))
        raise RuntimeError("nvjpegCreateSimple failed: 7")

    monkeypatch.setattr(gp, "decode_jpeg", broken)
    monkeypatch.setattr(gp, "_decoder_broken", {})
    with pytest.warns(RuntimeWarning, match="decoded by PIL from now on") as record:
        got = gp.prepare_batch_on_device(items, cfg, None, "cpu")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert calls == [3, 1, 1, 1, 1]  # the batch, each file alone, then a sound probe JPEG: broken
    assert gp.decoder_broken("cpu") == "RuntimeError: nvjpegCreateSimple failed: 7"
    assert gp.decoder_broken("cuda") is None  # per device type
    ref = prepare_batch(items, cfg, None)
    assert list(got["status"]) == ["ok"] * 3
    for k in ("whole", "face", "patches"):
        assert diff(got[k].numpy(), ref[k]).max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning
        again = gp.prepare_batch_on_device(items, cfg, None, "cpu")
    assert calls == [3, 1, 1, 1, 1]  # no more decoder calls
    assert list(again["status"]) == ["ok"] * 3


@pytest.mark.parametrize("case", ["one_file", "different_errors", "one_decodes"])
def test_failures_that_do_not_switch_the_decoder_off(case, monkeypatch):
    """A batch of one, errors that differ per file, or one file that decodes alone: bad files, not a broken decoder."""
    blobs = [astronaut_jpeg_bytes(90), astronaut_jpeg_bytes(80, 600, 400)]
    real = gp.decode_jpeg

    def flaky(data, **kw):
        if len(data) > 1:
            raise RuntimeError("batch failed")
        if case == "one_decodes" and bytes(data[0].numpy()) == blobs[0]:
            return real(data, **kw)
        raise RuntimeError(f"bad file {len(bytes(data[0].numpy())) if case == 'different_errors' else ''}")

    monkeypatch.setattr(gp, "decode_jpeg", flaky)
    monkeypatch.setattr(gp, "_decoder_broken", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = gp._decode(blobs[:1] if case == "one_file" else blobs, torch.device("cpu"))
    assert (got[0] is not None) == (case == "one_decodes") and got[-1] is None
    assert gp.decoder_broken("cpu") is None


def test_files_damaged_alike_leave_the_decoder_on(bundle, monkeypatch):
    def damaged(data: bytes) -> bytes:  # the first scan names a component the frame lacks
        sos = data.index(b"\xff\xda")
        return data[:sos + 5] + b"\x09" + data[sos + 6:]

    bad = [damaged(astronaut_jpeg_bytes(90)), damaged(astronaut_jpeg_bytes(80, 600, 400))]
    monkeypatch.setattr(gp, "_decoder_broken", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no switch-off warning
        got = gp.prepare_batch_on_device(bad, bundle.config, None, "cpu")
    assert list(got["error_code"]) == list(prepare_batch(bad, bundle.config, None)["error_code"]) == ["truncated"] * 2
    assert gp.decoder_broken("cpu") is None
    calls, real = [], gp.decode_jpeg
    monkeypatch.setattr(gp, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    assert gp._decode([astronaut_jpeg_bytes(90)], torch.device("cpu"))[0] is not None and calls == [1]
