"""Where finished videos live: one folder per job under an fsspec URL (a local directory by default).

The decode stage writes `video.mp4`, `thumbnail.webp`, `spritesheet.jpg` and optionally `frames.npy` (the
float32 frames, for bit-exact checks); the ingress streams them back. Any fsspec filesystem works (s3://,
gs://, a shared volume) as long as the decode replicas and the ingress both reach it.
"""
from __future__ import annotations

import io
from typing import Iterator

import fsspec
import numpy as np

CHUNK_BYTES = 1 << 20
SPRITES = 8  # frames in the spritesheet strip


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, job_id: str, name: str = "") -> str:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"bad job id {job_id!r}")
        return f"{self.root.rstrip('/')}/{job_id}" + (f"/{name}" if name else "")

    def put(self, job_id: str, name: str, data: bytes) -> str:
        self.fs.makedirs(self._path(job_id), exist_ok=True)
        path = self._path(job_id, name)
        self.fs.pipe_file(path, data)
        return path

    def exists(self, job_id: str, name: str) -> bool:
        return self.fs.exists(self._path(job_id, name))

    def read_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        with self.fs.open(self._path(job_id, name), "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def delete(self, job_id: str) -> None:
        path = self._path(job_id)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def write_outputs(self, job_id: str, frames: np.ndarray, fps: int, save_frames: bool) -> dict[str, str]:
        """Write the video and its previews; returns {artifact name: stored path}."""
        from srserve.pipeline.video import encode_mp4

        stored = {"video.mp4": self.put(job_id, "video.mp4", encode_mp4(frames, fps))}
        stored["thumbnail.webp"] = self.put(job_id, "thumbnail.webp", _image(frames[len(frames) // 2], "WEBP"))
        stored["spritesheet.jpg"] = self.put(job_id, "spritesheet.jpg", _image(_strip(frames), "JPEG"))
        if save_frames:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(frames, dtype=np.float32))
            stored["frames.npy"] = self.put(job_id, "frames.npy", buffer.getvalue())
        return stored


def _strip(frames: np.ndarray) -> np.ndarray:
    picks = np.linspace(0, len(frames) - 1, num=min(SPRITES, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in picks], axis=1)


def _image(frame: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    from srserve.pipeline.video import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(frame)).save(buffer, format=fmt)
    return buffer.getvalue()
