"""The project's progress lines: counts, rate and ETA; one per Ray Data execution of the driver
(read from Ray's own executor, so this runs a tiny real dataset)."""
import io
import time

from must_ray.progress import ProgressLine, RayDataProgress, progress_tag, progress_text, show_ray_data_progress


def test_progress_text_has_rate_and_eta():
    assert progress_text("world", 50, 200, "rows", 25.0) == "[world] 50/200 rows, 25.0 rows/s, ETA 6s"
    assert progress_text("x", 3, None, "images", 1.5, " (note)") == "[x] 3 images, 1.5 images/s (note)"
    screen = io.StringIO()
    line = ProgressLine("transfer", 4, "backbones", every_s=0.0, stream=screen)
    line.update(1)
    line.finish()
    out = screen.getvalue().splitlines()
    assert out[0].startswith("[transfer] 1/4 backbones, ") and "ETA" in out[0] and " in 0s" in out[1]


def test_every_driver_ray_data_execution_draws_a_tagged_line(ray_session, capsys, monkeypatch):
    import ray

    def slow(batch):  # nested: Ray ships it by value (the tests folder is not a package)
        time.sleep(0.05)
        return batch

    monkeypatch.setattr(RayDataProgress, "every_s", 0.0)
    monkeypatch.setattr(RayDataProgress, "quiet_s", 0.0)
    show_ray_data_progress()
    try:
        with progress_tag("evaluate"):
            ray.data.range(40, override_num_blocks=4).map_batches(slow, batch_size=5).materialize()
        with progress_tag("label", ray_data=False):
            ray.data.range(8).materialize()
    finally:
        ray.data.DataContext.get_current().custom_execution_callback_classes.remove(RayDataProgress)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert lines and all(line.startswith("[evaluate] ") for line in lines), err
    assert lines[-1].startswith("[evaluate] 40 rows in ") and "rows/s" in lines[-1]
