"""`piqa weights`: what -o may be written over, and one-line errors for files that are not what they should be."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from piqa_core import checkpoints
from piqa_core.checkpoints import build_bundle, save_checkpoint
from ray_jobs.cli import main
from tests.test_checkpoints import legacy_zip, official_layout, openai_layout


def _weights(*args) -> Result:
    return CliRunner().invoke(main, ["weights", *map(str, args)])


def _one_line_error(res, *fragments: str) -> None:
    """Exit 1 through click (not an uncaught exception) with one `Error: …` line holding every fragment."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    for fragment in fragments:
        assert fragment in res.output, res.output


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, Path]:
    """Official-layout files of a tiny model (what PIQ_model.pth, LIQE.pt and the RetinaFace zip look like)."""
    d = tmp_path_factory.mktemp("official")
    src = build_bundle("tiny", seed=5, text_features=False)
    torch.save(official_layout(src.model), d / "PIQ_model.pth")
    torch.save(openai_layout(src.liqe), d / "LIQE.pt")
    (d / "r.zip").write_bytes(legacy_zip(src.detector.net.state_dict()))
    return {"piq": d / "PIQ_model.pth", "liqe": d / "LIQE.pt", "retina": d / "r.zip"}


def _import(official, out, *extra):
    return _weights("import-official", official["piq"], official["liqe"], "--retinaface", official["retina"],
                    "--preset", "tiny", "-o", out, *extra)


def test_out_with_files_is_refused_and_force_replaces_only_a_model_directory(official, tmp_path):
    off = tmp_path / "official"
    assert _import(official, off).exit_code == 0
    before = (off / "config.json").read_text()
    res = _weights("random", "--preset", "tiny", "--seed", "9", "-o", off)
    _one_line_error(res, f"-o {off} exists and is not empty", "--force")
    assert (off / "config.json").read_text() == before and json.loads(before)["model_id"] == "dn-piqa-official"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    for force in ((), ("--force",)):
        res = _weights("random", "--preset", "tiny", "-o", other, *force)
        _one_line_error(res, f"-o {other}")
        assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert "only a piqa model directory" in res.output

    assert _weights("random", "--preset", "tiny", "--seed", "9", "-o", off, "--force").exit_code == 0
    assert json.loads((off / "config.json").read_text())["model_id"] == "random-tiny-seed9"
    (tmp_path / "empty").mkdir()
    assert _weights("random", "--preset", "tiny", "-o", tmp_path / "empty").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "official", "other"]  # no temporary left


def test_a_crash_while_writing_never_leaves_half_a_directory(tmp_path, monkeypatch):
    out, written = tmp_path / "models" / "m", []
    real_save = checkpoints.save_checkpoint

    def dies_half_way(bundle, directory, extra=None):
        written.append(Path(directory))
        (Path(directory) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", dies_half_way)
    assert _weights("random", "--preset", "tiny", "-o", out).exit_code == 1
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert written[0].parent == out.parent and written[0] != out  # written under a sibling name, renamed after

    real_save(build_bundle("tiny", seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _weights("random", "--preset", "tiny", "-o", out, "--force").exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and [p.name for p in out.parent.iterdir()] == ["m"]

    (out.parent / ".m.1234abcd.tmp").mkdir()  # what a SIGKILL mid-write leaves
    (out.parent / ".m.v2.1234abcd.tmp").mkdir()  # a leftover of -o m.v2, not of -o m
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    res = _weights("random", "--preset", "tiny", "-o", out.parent / "n")
    assert res.exit_code == 0 and "left by an interrupted run" not in res.output  # another folder's
    res = _weights("random", "--preset", "tiny", "-o", out, "--force")
    assert res.exit_code == 0
    assert f"1 folder(s) beside {out} left by an interrupted run: .m.1234abcd.tmp;" in res.output


def test_force_leaves_files_that_appear_in_out_while_it_writes(tmp_path, monkeypatch):
    out, real_save = tmp_path / "m", checkpoints.save_checkpoint

    def someone_writes_meanwhile(bundle, directory, extra=None):
        (out / "notes.txt").write_text("mine")
        return real_save(bundle, directory, extra)

    monkeypatch.setattr(checkpoints, "save_checkpoint", someone_writes_meanwhile)
    out.mkdir()  # empty when checked
    _one_line_error(_weights("random", "--preset", "tiny", "-o", out, "--force"), "files appeared in it")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_out_with_a_scheme_or_a_symlink_is_refused(official, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(_weights("random", "--preset", "tiny", "-o", "s3://models/piqa/m"),
                    "write it locally", "aws s3 sync DIR s3://models/piqa/m")
    _one_line_error(_import(official, "s3://models/piqa/m"), "aws s3 sync")
    assert list(tmp_path.iterdir()) == []  # no ./s3:/ folder
    save_checkpoint(build_bundle("tiny"), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")  # --force would rename the link, not the folder
    _one_line_error(_weights("random", "--preset", "tiny", "--force", "-o", tmp_path / "link"), "symbolic link")
    assert (tmp_path / "link").is_symlink()


def test_unreadable_official_files_and_unknown_presets_are_one_line_errors(official, tmp_path):
    trunc, text = tmp_path / "PIQ_model.pth", tmp_path / "LIQE.pt"
    trunc.write_bytes(official["piq"].read_bytes()[:5000])
    text.write_text("<html>404 Not Found</html>\n")
    unreadable = "not a readable torch checkpoint (truncated, or another kind of file?)"
    for piq, liqe, bad in ((trunc, official["liqe"], trunc), (official["piq"], text, text)):
        res = _weights("import-official", piq, liqe, "--retinaface", official["retina"], "--preset", "tiny",
                       "-o", tmp_path / "out")
        _one_line_error(res, f"{bad}: {unreadable}")
    _one_line_error(_weights("random", "--preset", "foo", "-o", tmp_path / "out"),
                    "unknown preset 'foo'; known presets: dn-piqa, tiny")
    _one_line_error(_import(official, tmp_path / "out", "--preset", "foo"), "unknown preset 'foo'")
    assert not (tmp_path / "out").exists()


def test_swapped_official_files_are_named(official, tmp_path):
    res = _weights("import-official", official["liqe"], official["piq"], "--retinaface", official["retina"],
                   "--preset", "tiny", "-o", tmp_path / "out")
    _one_line_error(res, f"LIQE {official['piq']}: not an OpenAI-layout CLIP ViT state dict",
                    "did you swap PIQ_MODEL and LIQE?")


def test_a_wrong_retinaface_file_is_named_with_the_release_expected(official, tmp_path):
    from piqa_core.official import RETINAFACE_FILE

    sd = build_bundle("tiny", seed=5, text_features=False).detector.net.state_dict()
    key = next(iter(sd))
    (tmp_path / "r.zip").write_bytes(legacy_zip({**{k: v for k, v in sd.items() if k != key}, "x." + key: sd[key]}))
    res = _weights("import-official", official["piq"], official["liqe"], "--retinaface", tmp_path / "r.zip",
                   "--preset", "tiny", "-o", tmp_path / "out")
    assert res.exit_code == 1 and f"RetinaFace {tmp_path / 'r.zip'}: the weights do not match" in res.output
    assert f"missing (1): {key}" in res.output and RETINAFACE_FILE in res.output and "--preset" not in res.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "m"
    save_checkpoint(build_bundle("tiny", text_features=False), d)
    return d


@pytest.mark.parametrize("damage", ["newer-key", "newer-section", "newer-format", "truncated"])
def test_info_on_a_newer_or_damaged_model_directory_is_a_one_line_error(damage, model_dir, tmp_path):
    meta, d = json.loads((model_dir / "config.json").read_text()), tmp_path / damage
    d.mkdir()
    if damage == "truncated":
        with open(model_dir / "model.safetensors", "rb") as f:
            blob = f.read(100_000)
        (d / "model.safetensors").write_bytes(blob)
        meta["sha256"] = hashlib.sha256(blob).hexdigest()  # the config agrees with the truncated file
        expected: tuple[str, ...] = (f"{d / 'model.safetensors'}: not a readable safetensors file",)
    else:
        os.link(model_dir / "model.safetensors", d / "model.safetensors")
        if damage == "newer-key":
            meta["config"]["preprocess"]["jpeg_draft"] = True  # a setting a newer piqa added
            expected = (f"{d / 'config.json'}: ", "unknown PreprocessConfig keys", "upgrade piqa")
        elif damage == "newer-section":
            meta["config"]["detector"] = {"input_size": 640}  # a section a newer piqa added
            expected = (f"{d / 'config.json'}: ", "unknown config sections: ['detector']", "upgrade piqa")
        else:
            meta["format"] = "piqa-checkpoint/2"
            expected = ("written by another piqa version", "'piqa-checkpoint/2'", "'piqa-checkpoint/1'")
    (d / "config.json").write_text(json.dumps(meta))
    _one_line_error(_weights("info", d), *expected)


def test_module_entrypoint_runs_the_weights_group():
    res = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "weights", "random", "-o", "s3://b/m"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "aws s3 sync" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_info_reads_a_model_directory_on_s3_through_the_endpoint_flag(model_dir, s3_server, s3_bucket, tmp_path,
                                                                      monkeypatch):
    import boto3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the weight cache lands beside it
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the flag, not the environment, names the server
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    for f in model_dir.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"models/m/{f.name}", Body=f.read_bytes())
    sha = json.loads((model_dir / "config.json").read_text())["sha256"]
    res = _weights("info", f"s3://{s3_bucket}/models/m", "--endpoint-url", s3_server.endpoint_url)
    assert res.exit_code == 0, res.output
    assert f"sha256        {sha}" in res.output and "preset        tiny" in res.output
    _one_line_error(_weights("info", f"s3://{s3_bucket}/models/none", "--endpoint-url", s3_server.endpoint_url),
                    f"s3://{s3_bucket}/models/none")
    _one_line_error(_weights("info", f"s3://{s3_bucket}/models/m2", "--endpoint-url", "http://127.0.0.1:9"),
                    "object store: ", "connect")  # nothing listens on port 9 (and nothing is cached for it)


def test_info_on_a_missing_local_folder_is_a_usage_error(tmp_path):
    res = _weights("info", tmp_path / "nope")
    assert res.exit_code == 2 and "is not a folder" in res.output, res.output
