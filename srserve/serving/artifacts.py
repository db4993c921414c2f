"""Where finished videos live: one folder per job under an fsspec URL (a local directory by default).

The decode stage writes `video.mp4`, `thumbnail.webp`, `spritesheet.jpg` and optionally `frames.npy` (the
float32 frames, for bit-exact checks); the ingress streams them back. Any fsspec filesystem works (s3://,
gs://, a shared volume) as long as the decode replicas and the ingress both reach it.

Stage checkpoints live beside them, in `checkpoints/<stage>.bin`: the state a denoising stage handed on, in the
wire form of `messages.dump_state` (a small pickle and the tensors' raw buffers, framed by their lengths), so a
retried job resumes after the last finished stage. The driver removes them when the job ends.
"""
from __future__ import annotations

import io
import re
import struct
import uuid
from typing import Any, Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

CHUNK_BYTES = 1 << 20
SPRITES = 8  # frames in the spritesheet strip
CHECKPOINTS = "checkpoints"
_MAGIC = b"SRCKPT1\n"
_STAGE = re.compile(r"[a-z]{1,32}")


class CheckpointMissing(RuntimeError):
    """A checkpoint to resume from is not there or not whole: the job must start over."""


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

    # --- stage checkpoints -----------------------------------------------------------------------------------
    def _checkpoint_path(self, job_id: str, stage: str) -> str:
        if not _STAGE.fullmatch(stage):
            raise ValueError(f"bad stage name {stage!r}")
        return self._path(job_id, f"{CHECKPOINTS}/{stage}.bin")

    def put_checkpoint(self, job_id: str, stage: str, state: Any) -> int:
        """Save the state `stage` hands on; returns the bytes written. Written whole or not at all: on a local
        filesystem to a unique temporary name then renamed (a zombie attempt may write the same file), on an object
        store by one PUT."""
        from srserve.serving.messages import dump_state

        header, buffers = dump_state(state)
        parts = [memoryview(header), *(b.raw() for b in buffers)]
        prefix = _MAGIC + struct.pack(f"<I{len(parts)}Q", len(parts), *(p.nbytes for p in parts))
        final = self._checkpoint_path(job_id, stage)
        local = isinstance(self.fs, LocalFileSystem)
        target = f"{final}.{uuid.uuid4().hex}.tmp" if local else final
        self.fs.makedirs(self._path(job_id, CHECKPOINTS), exist_ok=True)
        with self.fs.open(target, "wb") as f:
            f.write(prefix)
            for part in parts:  # the tensors' own memory: no joined copy
                f.write(part)
        if local:
            self.fs.mv(target, final)
        return len(prefix) + sum(p.nbytes for p in parts)

    def load_checkpoint(self, job_id: str, stage: str) -> Any:
        """The state `put_checkpoint` saved; CheckpointMissing when it is absent or not whole."""
        from srserve.serving.messages import load_state

        try:
            data = self.fs.cat_file(self._checkpoint_path(job_id, stage))
        except FileNotFoundError:
            raise CheckpointMissing(f"no {stage} checkpoint for job {job_id}") from None
        view, start = memoryview(data), len(_MAGIC) + 4
        if bytes(view[:len(_MAGIC)]) != _MAGIC or len(data) < start:
            raise CheckpointMissing(f"the {stage} checkpoint of job {job_id} is not a srserve checkpoint")
        (count,) = struct.unpack_from("<I", data, len(_MAGIC))
        sizes = struct.unpack_from(f"<{count}Q", data, start) if len(data) >= start + 8 * count else ()
        offset = start + 8 * count
        if len(sizes) != count or not count or offset + sum(sizes) != len(data):
            raise CheckpointMissing(f"the {stage} checkpoint of job {job_id} is truncated")
        parts = []
        for size in sizes:
            parts.append(view[offset:offset + size])
            offset += size
        try:
            return load_state(bytes(parts[0]), parts[1:])
        except Exception as err:  # another wire or handoff version (an upgrade between attempts), or damaged
            raise CheckpointMissing(f"the {stage} checkpoint of job {job_id} cannot be read: {err}") from None

    def checkpoints(self, job_id: str) -> list[str]:
        """The stages whose checkpoint this job has."""
        folder = self._path(job_id, CHECKPOINTS)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        stems = (str(n).rsplit("/", 1)[-1] for n in names)
        return sorted(n[:-4] for n in stems if n.endswith(".bin") and _STAGE.fullmatch(n[:-4]))

    def delete_checkpoints(self, job_id: str) -> None:
        """Drop the job's checkpoints (it ended: only the video variants stay)."""
        folder = self._path(job_id, CHECKPOINTS)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    def write_outputs(self, job_id: str, frames: np.ndarray, fps: int, save_frames: bool) -> dict[str, str]:
        """Write the video and its previews; returns {artifact name: stored path}."""
        return {name: self.put(job_id, name, data) for name, data in encode_outputs(frames, fps, save_frames)}


def encode_outputs(frames: np.ndarray, fps: int, save_frames: bool) -> Iterator[tuple[str, bytes]]:
    """(artifact name, bytes) of a finished video, encoded one at a time: Decode checks for a stop between them
    and writes none until all are encoded, so a stopped decode leaves no partial set."""
    from srserve.pipeline.video import encode_mp4

    yield "video.mp4", encode_mp4(frames, fps)
    yield "thumbnail.webp", _image(frames[len(frames) // 2], "WEBP")
    yield "spritesheet.jpg", _image(_strip(frames), "JPEG")
    if save_frames:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(frames, dtype=np.float32))
        yield "frames.npy", buffer.getvalue()


def _strip(frames: np.ndarray) -> np.ndarray:
    picks = np.linspace(0, len(frames) - 1, num=min(SPRITES, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in picks], axis=1)


def _image(frame: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    from srserve.pipeline.video import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(frame)).save(buffer, format=fmt)
    return buffer.getvalue()
