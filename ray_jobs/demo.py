"""`make demo`: the scoring job on an embedded local Ray, local folders and sample photos.

The photos come from scikit-image's bundled data (no download); the model is the `tiny` preset with
random weights, since no real weights ship with the project: the run shows the pipeline, not quality.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageFilter

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field")


def write_samples(folder: Path) -> list[Path]:
    """Sample photos (a few degraded copies of the portrait, two broken files) under ``folder``."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLES:
        arr = getattr(skimage.data, name)()
        path = folder / ("portraits" if name == "astronaut" else "scenes") / f"{name}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.asarray(arr)).save(path, quality=92)
        written.append(path)
    portrait = Image.fromarray(skimage.data.astronaut())
    variants = {
        "astronaut_blur.jpg": portrait.filter(ImageFilter.GaussianBlur(4)),
        "astronaut_dark.jpg": Image.eval(portrait, lambda v: v // 4),
    }
    for name, img in variants.items():
        img.save(folder / "portraits" / name, quality=92)
        written.append(folder / "portraits" / name)
    buf = io.BytesIO()
    portrait.save(buf, format="JPEG", quality=5)
    (folder / "portraits" / "astronaut_q5.jpg").write_bytes(buf.getvalue())
    (folder / "broken").mkdir(exist_ok=True)
    (folder / "broken" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "broken" / "empty.png").write_bytes(b"")
    written += [folder / "portraits" / "astronaut_q5.jpg", folder / "broken" / "truncated.jpg",
                folder / "broken" / "empty.png"]
    return written


@click.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--num-cpus", type=click.IntRange(1), default=None, help="Local Ray CPUs (default: all).")
def main(out: str, num_cpus: int | None) -> None:
    """Score sample photos with the Ray pipeline and print the results."""
    import pyarrow.compute as pc
    import ray

    from .options import ModelOptions
    from .resume import read_rows
    from .score import ScoreJob, run_score_job

    root = Path(out).resolve()
    images = root / "images"
    write_samples(images)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # "local": a new embedded Ray, even where RAY_ADDRESS names a cluster (which has no local folders)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        model = ModelOptions(weights=None, random_weights=True, preset="tiny", crop_mode=None,
                             precision="fp32", device=None, batch_size=8)
        summary = run_score_job(ScoreJob(inputs=[str(images)], out=str(root / "scores"), model=model))
    finally:
        ray.shutdown()
    table = read_rows(str(root / "scores"), run_id=summary["run_id"])
    table = table.sort_by([("status", "descending"), ("uri", "ascending")])
    click.echo(f"\n{'image':<42} {'status':<6} {'score':>8}  face  error")
    for r in table.to_pylist():
        name = os.path.relpath(r["uri"], images)
        score = f"{r['score']:8.4f}" if r["score"] is not None else " " * 8
        click.echo(f"{name:<42} {r['status']:<6} {score}  {'yes' if r['face_found'] else 'no ':<4}  "
                   f"{r['error_code'] or ''}")
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    click.echo(f"\n{table.num_rows} rows ({ok} ok) written under {root / 'scores'}")
    click.echo(f"summary: {root / 'scores' / ('_summary-' + summary['run_id'] + '.json')}")
    click.echo("NOTE: the demo uses random weights (the 'tiny' preset): scores are not quality judgements.\n"
               "      Real scoring: `piqa weights import-official PIQ_model.pth LIQE.pt -o model/` then "
               "`piqa score ... --weights model/`.", err=False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
