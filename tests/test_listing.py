"""Listing inputs: folders, prefixes and manifests on a local disk and on S3 (moto), and bad names."""

from __future__ import annotations

import io
import logging
import os

import fsspec.implementations.memory
import pyarrow as pa
import pytest
from PIL import Image

from piqa_core.config import PreprocessConfig
from piqa_core.preprocess import decode_image
from ray_jobs import inputs, listing, storage
from ray_jobs.storage import S3Options

TREE = {
    "a.JPG": b"aaa",
    "b.png": b"bb",
    "notes.txt": b"not an image",
    "empty.jpeg": b"",
    "sub/c.webp": b"cccc",
    "sub/deeper/d.TIFF": b"d",
}
IMAGES = ["a.JPG", "b.png", "empty.jpeg", "sub/c.webp", "sub/deeper/d.TIFF"]


def populate(base: str, s3: S3Options | None) -> None:
    for rel, data in TREE.items():
        storage.write_bytes(storage.join(base, rel), data, s3)
    storage.write_bytes(storage.join(base + "2", "x.jpg"), b"x", s3)  # a sibling, not a child


def test_list_images(root):
    base, s3 = root
    populate(base, s3)
    infos = listing.list_images(base, s3)
    assert [i.uri for i in infos] == sorted(storage.join(base, p) for p in IMAGES)
    assert infos == listing.list_images(base + "/", s3)  # trailing slash, deterministic
    sizes = {i.uri: i.size for i in infos}
    assert sizes[storage.join(base, "empty.jpeg")] == 0
    assert sizes[storage.join(base, "sub/c.webp")] == 4
    assert all(i.etag_or_mtime for i in infos)
    if s3 is None:
        assert infos[0].etag_or_mtime.isdigit()  # mtime_ns
    else:
        assert infos[0].uri.startswith("s3://") and '"' not in infos[0].etag_or_mtime

    everything = listing.list_images(base, s3, extensions=None)
    assert len(everything) == len(TREE)
    assert [i.uri for i in listing.list_images(base, s3, extensions=(".tiff", "PNG"))] == [
        storage.join(base, "b.png"),
        storage.join(base, "sub/deeper/d.TIFF"),
    ]
    top = listing.list_images(base, s3, recursive=False)
    assert [os.path.basename(i.uri) for i in top] == ["a.JPG", "b.png", "empty.jpeg"]
    single = listing.list_images(storage.join(base, "notes.txt"), s3)
    assert [(i.uri, i.size) for i in single] == [(storage.join(base, "notes.txt"), 12)]
    assert listing.list_images(storage.join(base, "notes.txt"), s3, recursive=False) == single

    with pytest.raises(FileNotFoundError, match="nope"):
        listing.list_images(storage.join(base, "nope"), s3)
    if s3 is not None:
        with pytest.raises(FileNotFoundError, match="s3://nope-bucket-404/x"):
            listing.list_images("s3://nope-bucket-404/x", s3)


def test_folder_markers_are_not_files_in_a_flat_listing(s3_server, s3_bucket, capsys):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    for key in ("lib/", "lib/a.jpg", "lib/sub/", "lib/sub/b.jpg"):  # as consoles make folders: empty "x/" objects
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"" if key.endswith("/") else b"jpg")
    for recursive, want in ((False, ["lib/a.jpg"]), (True, ["lib/a.jpg", "lib/sub/b.jpg"])):
        for extensions in (None, listing.IMAGE_EXTENSIONS):
            got = listing.list_images(f"s3://{s3_bucket}/lib", s3_server.options, extensions, recursive=recursive)
            assert [i.uri for i in got] == [f"s3://{s3_bucket}/{k}" for k in want], (recursive, extensions)
    assert "left out" not in capsys.readouterr().err


def test_a_file_gone_during_the_listing_keeps_its_place(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"aa")
    (tmp_path / "b.jpg").write_bytes(b"b")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")  # stat fails with ELOOP: a row, not a failed job
    real_walk = os.walk

    def walk_then_delete(top, *args, **kwargs):  # an ingest deletes b.jpg right after the walk saw it
        for entry in real_walk(top, *args, **kwargs):
            (tmp_path / "b.jpg").unlink(missing_ok=True)
            yield entry

    monkeypatch.setattr(listing.os, "walk", walk_then_delete)
    infos = listing.list_images(str(tmp_path))
    assert [(os.path.basename(i.uri), i.size) for i in infos] == [("a.jpg", 2), ("b.jpg", -1), ("dangling.jpg", -1),
                                                                   ("loop.jpg", -1)]
    assert infos[1].etag_or_mtime == "" and infos[0].etag_or_mtime.isdigit()


def test_list_inputs(root):
    base, s3 = root
    populate(base, s3)
    sub, top = storage.join(base, "sub"), storage.join(base, "b.png")
    infos = inputs.list_inputs([sub, top, base], s3)
    uris = [i.uri for i in infos]
    assert uris[:3] == [storage.join(sub, "c.webp"), storage.join(sub, "deeper/d.TIFF"), top]
    assert sorted(uris) == sorted(storage.join(base, p) for p in IMAGES)  # each URI once
    manifest = storage.join(base, "m.txt")
    storage.write_text(manifest, "b.png\nnothing.jpg\n", s3)
    got = [(i.uri, i.size) for i in inputs.list_inputs(manifest, s3, manifest=True)]
    assert got == [(top, 2), (storage.join(base, "nothing.jpg"), -1)]


def _make_bad_name(folder, name: bytes = b"bad\xff.jpg", data: bytes = b"xyz") -> None:
    fd = os.open(os.path.join(os.fsencode(str(folder)), name), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)


def test_a_non_utf8_file_name_is_listed_printably_and_marked(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    _make_bad_name(tmp_path)
    os.mkdir(os.path.join(os.fsencode(str(tmp_path)), b"dir\xfe"))
    _make_bad_name(os.path.join(str(tmp_path), os.fsdecode(b"dir\xfe")), b"in.jpg")
    infos = listing.list_images(str(tmp_path))
    got = [(i.uri[len(str(tmp_path)) + 1:], i.size, i.etag_or_mtime) for i in infos]
    assert got[:2] == [("bad\\xff.jpg", -1, listing.NAME_NOT_UTF8), ("dir\\xfe/in.jpg", -1, listing.NAME_NOT_UTF8)]
    assert got[2][:2] == ("ok.jpg", 2) and got[2][2].isdigit()
    assert pa.array([i.uri for i in infos]).type == pa.string()  # the job's uri column takes them


def test_an_unreadable_folder_fails_the_listing(tmp_path, monkeypatch):
    locked = tmp_path / "lib" / "locked"
    locked.mkdir(parents=True)
    (locked / "a.jpg").write_bytes(b"a")
    (tmp_path / "lib" / "b.jpg").write_bytes(b"b")
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would (the tests may run as root, who reads anything)
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    with pytest.raises(listing.ListingError) as err:
        listing.list_images(str(tmp_path / "lib"))
    assert isinstance(err.value, OSError) and not isinstance(err.value, FileNotFoundError)
    assert str(err.value) == f"cannot list folder {locked}: Permission denied"
    with pytest.raises(listing.ListingError, match="Permission denied"):
        listing.list_images(str(locked), recursive=False)
    assert [os.path.basename(i.uri) for i in listing.list_images(str(tmp_path / "lib"), recursive=False)] == ["b.jpg"]


def test_symlinked_folders_are_followed_like_symlinked_files_each_once(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    (lib / "sub").mkdir(parents=True)
    outside.mkdir()
    (lib / "a.jpg").write_bytes(b"a")
    (outside / "c.jpg").write_bytes(b"cc")
    (lib / "f.jpg").symlink_to(outside / "c.jpg")
    (lib / "l1").symlink_to(outside)
    (lib / "l2").symlink_to(outside)  # the same real folder again: listed once, under l1
    (lib / "sub" / "loop").symlink_to(lib)  # a loop ends where it started
    infos = listing.list_images(str(lib))
    assert [(os.path.relpath(i.uri, lib), i.size) for i in infos] == [("a.jpg", 1), ("f.jpg", 2), ("l1/c.jpg", 2)]


class _DeniedFS(fsspec.implementations.memory.MemoryFileSystem):
    """A remote store whose folder ``locked`` cannot be listed."""

    protocol = "denied"
    store: dict = {}  # not the memory:// store
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("denied://"))

    def ls(self, path, detail=True, **kwargs):
        if self._strip_protocol(path).rstrip("/").endswith("locked"):
            raise PermissionError(13, "Access Denied", path)
        return super().ls(path, detail=detail, **kwargs)


@pytest.mark.parametrize("recursive", [True, False])
def test_a_remote_folder_that_cannot_be_listed_fails_the_listing(recursive):
    fsspec.register_implementation("denied", _DeniedFS, clobber=True)
    fs = _DeniedFS()
    for name in ("lib/a.jpg", "lib/locked/b.jpg", "lib/sub/c.jpg"):
        fs.pipe(f"/{name}", b"x")
    try:
        with pytest.raises(PermissionError, match="Access Denied"):
            listing.list_images("denied://lib/locked", recursive=recursive)
        if recursive:
            with pytest.raises(PermissionError, match="Access Denied"):
                listing.list_images("denied://lib")
        else:  # only the top level is listed: the locked subfolder is not opened
            assert [os.path.basename(i.uri) for i in listing.list_images("denied://lib", recursive=False)] == ["a.jpg"]
    finally:
        _DeniedFS.store.clear()


def test_a_new_link_to_an_album_does_not_move_its_files(tmp_path):
    lib = tmp_path / "lib"
    for rel in ("albumA/a.jpg", "albumB/b.jpg", "albumB/sub/c.jpg"):
        storage.write_bytes(str(lib / rel), b"x")
    (tmp_path / "alias").symlink_to(lib)  # the library named through a link: its own paths are still canonical
    before = {top: [os.path.relpath(i.uri, top) for i in listing.list_images(str(top))]
              for top in (lib, tmp_path / "alias")}
    (lib / "0_favorites").symlink_to(lib / "albumB")  # sorts before albumB
    (lib / "albumA" / "0_best").symlink_to("../albumB/sub")  # relative, and deeper
    for top, uris in before.items():
        assert uris == ["albumA/a.jpg", "albumB/b.jpg", "albumB/sub/c.jpg"]
        assert [os.path.relpath(i.uri, top) for i in listing.list_images(str(top))] == uris


def test_a_folder_reached_only_through_links_is_listed_once_under_the_first(tmp_path, monkeypatch):
    lib, outside = tmp_path / "lib", tmp_path / "lib2"  # outside, though its path extends lib's
    for path in (lib / "a.jpg", lib / "zalbum" / "z.jpg", outside / "o.jpg", outside / "deep" / "d.jpg"):
        storage.write_bytes(str(path), b"x")
    (lib / "b_sub").mkdir()
    (lib / "b_sub" / "x").symlink_to(outside)  # first in sorted order (b_sub/x before c), though deeper
    (lib / "c").symlink_to(outside)
    (outside / "deep" / "loop").symlink_to(outside)
    (outside / "back").symlink_to(lib / "zalbum")  # into the library: listed under its own path only
    (outside / "up").symlink_to(lib)
    got = [os.path.relpath(i.uri, lib) for i in listing.list_images(str(lib))]
    assert got == ["a.jpg", "b_sub/x/deep/d.jpg", "b_sub/x/o.jpg", "zalbum/z.jpg"]
    real_scandir = os.scandir

    def scandir(path="."):  # the linked folder cannot be read: the listing fails, it does not drop it
        if os.fspath(path) == str(lib / "b_sub" / "x" / "deep"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    with pytest.raises(listing.ListingError, match="b_sub/x/deep: Permission denied"):
        listing.list_images(str(lib))


def _encoded(fmt: str) -> bytes:
    buf, img = io.BytesIO(), Image.new("RGB", (256, 240), (200, 30, 30))
    extra = {"save_all": True, "append_images": [img.copy()]} if fmt == "MPO" else {}
    img.save(buf, fmt, **extra)
    return buf.getvalue()


def _left_out_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == listing.__name__ and r.levelno == logging.WARNING]


def test_other_names_of_jpeg_mpo_and_png_are_listed_and_decode(root, caplog):
    base, s3 = root
    files = {"a.jfif": _encoded("JPEG"), "b.JPE": _encoded("JPEG"), "sub/c.mpo": _encoded("MPO"),
             "d.apng": _encoded("PNG"), "e.jpg": _encoded("JPEG")}
    for rel, data in files.items():
        storage.write_bytes(storage.join(base, rel), data, s3)
    caplog.set_level(logging.WARNING, logger=listing.__name__)
    infos = listing.list_images(base, s3)
    assert [i.uri for i in infos] == sorted(storage.join(base, rel) for rel in files)
    for info in infos:
        assert decode_image(storage.read_bytes(info.uri, s3), PreprocessConfig()).size == (256, 240), info.uri
    assert _left_out_warnings(caplog) == []  # only images: nothing to report


def test_files_left_out_for_their_extension_are_counted_in_one_warning(root, caplog):
    base, s3 = root
    photos = ["a.heic", "notes.txt", "sub/b.HEIC", "x.docx"]
    quiet = [".DS_Store", "._hidden.txt", ".cache/x.bin", "_SUCCESS", "__MACOSX/y.dat", "Thumbs.db",
             "sub/desktop.ini", "state/CURRENT", "state/IN_PROGRESS", "state/states/r1.parquet",
             "state/runs/r1/plan.parquet", "state/reports/r1/summary.json", "state/reports/r1/report.html"]
    for rel in ["ok.jpg", "sub/ok.jfif", *photos, *quiet]:
        storage.write_bytes(storage.join(base, rel), b"x", s3)
    caplog.set_level(logging.WARNING, logger=listing.__name__)
    infos = listing.list_images(base, s3)
    assert sorted(os.path.relpath(i.uri, base) for i in infos) == ["ok.jpg", "sub/ok.jfif"]
    assert _left_out_warnings(caplog) == [
        f"{base}: left out 4 file(s) that are not images by extension (a.heic, notes.txt, sub/b.HEIC, …); "
        f"the extensions scored: {' '.join(listing.IMAGE_EXTENSIONS)}"]

    caplog.clear()
    listing.list_images(base, s3, recursive=False)
    assert _left_out_warnings(caplog) == [
        f"{base}: left out 3 file(s) that are not images by extension (a.heic, notes.txt, x.docx); "
        f"the extensions scored: {' '.join(listing.IMAGE_EXTENSIONS)}"]
    caplog.clear()
    assert len(listing.list_images(base, s3, extensions=None)) == 2 + len(photos) + len(quiet)
    assert listing.list_images(storage.join(base, "notes.txt"), s3)[0].size == 1  # named directly: listed
    assert _left_out_warnings(caplog) == []


def test_every_listed_extension_names_a_format_the_decoder_reads() -> None:
    from PIL import Image

    from piqa_core.image_formats import DECODABLE_FORMATS

    pillow = Image.registered_extensions()
    exts = listing.IMAGE_EXTENSIONS
    assert {e: pillow.get(e) in DECODABLE_FORMATS for e in exts} == dict.fromkeys(exts, True)


def test_stat_each_tells_a_missing_object_from_one_it_cannot_check(s3_server, s3_bucket, tmp_path, monkeypatch):
    """A 404 is a missing image; an unreachable endpoint or a 403 says nothing of the image."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take seconds an entry
    opts, here = s3_server.options, f"s3://{s3_bucket}/here.jpg"
    storage.write_bytes(here, b"abc", opts)
    (tmp_path / "a.jpg").write_bytes(b"a")
    real_info = s3fs.S3FileSystem._info

    async def forbidden(self, path, **kwargs):
        if path.endswith("secret.jpg"):
            raise PermissionError(13, "Access Denied")
        return await real_info(self, path, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_info", forbidden)
    uris = [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg"), str(tmp_path / "a.jpg" / "x.jpg"), str(tmp_path),
            here, f"s3://{s3_bucket}/gone.jpg", f"s3://{s3_bucket}", f"s3://{s3_bucket}/secret.jpg",
            "htps://example.com/x.jpg"]
    got = listing.stat_each(uris, opts)
    assert [o.size for o, _ in got] == [1, -1, -1, -1, 3, -1, -1, -1, -1]
    assert [e is None or isinstance(e, listing.MISSING) for _, e in got] == [True] * 7 + [False, False]
    assert got[0][1] is None and got[4][1] is None and isinstance(got[7][1], PermissionError)
    # The scoring path keeps a row for each, whatever the reason (the read step records it).
    assert listing.stat_objects(uris, opts) == [o for o, _ in got]
    unreachable = S3Options("http://127.0.0.1:9", "us-east-1", access_key="testing", secret_key="testing")
    (info, err), = listing.stat_each([here], unreachable)
    assert info.size == -1 and not isinstance(err, listing.MISSING) and "127.0.0.1:9" in str(err)
    assert [o.size for o in listing.stat_objects([here], unreachable)] == [-1]
