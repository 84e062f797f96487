"""Progress with ETA on long work (issue 18, point 7): counted items (eval windows, router-embed
windows) as well as bytes, and training step lines with elapsed time and ETA."""

import io

from flexmoe.io.progress import Progress, format_seconds

from test_run_dirs import SMALL, _flexmoe, work  # noqa: F401  (the prepared data fixture)


def test_item_progress_lines_and_eta():
    clock = iter([0.0, 10.0, 20.0, 40.0, 40.0]).__next__
    buf = io.StringIO()
    p = Progress("eval code", 400, stream=buf, clock=clock, log_every=10.0, unit="windows")
    p.advance(100)  # t=10
    p.advance(100)  # t=20
    assert buf.getvalue().splitlines() == ["[flexmoe] eval code: 100 / 400 windows (25%), 10.0 windows/s, ETA 30s",
                                           "[flexmoe] eval code: 200 / 400 windows (50%), 10.0 windows/s, ETA 20s"]
    p.advance(200)  # t=40
    p.finish("done")
    assert buf.getvalue().splitlines()[-1] == "[flexmoe] eval code: done, 400 windows in 40.0s"
    assert [format_seconds(s) for s in (5, 64, 3725)] == ["5s", "1m04s", "1h02m"]


def test_training_lines_show_elapsed_and_eta(work, tmp_path):  # noqa: F811  (the fixture)
    r = _flexmoe(tmp_path, "train", *SMALL, f"+data.train.t={work / 'data'}", "trainer.steps=4",
                 f"out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [ln for ln in r.stderr.splitlines() if "step " in ln and "/4" in ln]
    assert len(steps) == 4 and all(" elapsed " in ln and " eta " in ln for ln in steps)
    assert steps[-1].endswith("eta 0s")
