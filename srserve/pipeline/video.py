"""Writing decoded frames: H.264 mp4 for people, float32 .npy for exact comparisons."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write (F, H, W, 3) float frames in [0, 1]: `.mp4` as H.264 (yuv420p), `.npy` as float32 unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, np.asarray(frames, dtype=np.float32))
    elif path.suffix == ".mp4":
        path.write_bytes(encode_mp4(frames, fps))
    else:
        raise ValueError(f"output {str(path)!r}: the extension must be .mp4 or .npy")
    return path


def encode_mp4(frames: np.ndarray, fps: int = 16) -> bytes:
    """H.264 mp4 bytes (yuv420p, so odd sizes lose their last row/column)."""
    import av
    import io

    video = to_uint8(frames)
    height, width = video.shape[1] - video.shape[1] % 2, video.shape[2] - video.shape[2] % 2
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame[:height, :width], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
