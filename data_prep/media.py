"""Image and video members for shard samples: read, check, and name the bytes a sample carries.

Images are stored as they are on disk when they are JPEG or PNG (no re-encoding: training decodes exactly the
file the dataset shipped); any other format (GIF, WebP, BMP, ...) is re-encoded once as JPEG. The member name
follows the *content*, not the file extension (a ``.jpg`` that is really a PNG is stored as ``png``).

Videos are decoded here, at prep time, with PyAV (FFmpeg: avi, mp4, webm, mkv, ...): ``num_frames`` frames are
sampled uniformly (the centre of each of ``num_frames`` equal segments) and stored as ``frame0.jpg`` ...
``frame{T-1}.jpg``, so training never decodes video.

Every failure raises :class:`SkipRecord` with a reason from the fixed list below, so the shard writer can skip the
record, count it, and list it in the summary.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_VIDEO = "missing video"
UNREADABLE_VIDEO = "unreadable video"
BAD_FIELD = "bad field"

JPEG_QUALITY = 95  # for re-encoded images and video frames: visually lossless, a quarter of PNG's size


class SkipRecord(Exception):
    """Raised while building one sample: the record is skipped with ``reason`` and listed with ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_decodes(image: Image.Image) -> None:
    # draft() lets libjpeg decode at 1/8 scale: every byte is still read (truncation is caught) at a fraction of
    # the cost of a full decode.
    if image.format == "JPEG":
        image.draft("RGB", (64, 64))
    image.load()


def image_member(path: str | Path) -> dict[str, bytes]:
    """The shard member for the image file at ``path``: ``{"jpg": bytes}`` or ``{"png": bytes}``.

    Raises SkipRecord(MISSING_IMAGE) when the file does not exist, SkipRecord(UNREADABLE_IMAGE) when it does not
    decode (truncated, not an image, empty).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipRecord(MISSING_IMAGE, str(path)) from None
    except OSError as error:
        raise SkipRecord(UNREADABLE_IMAGE, f"{path}: {error}") from None
    return image_bytes_member(data, str(path))


def image_bytes_member(data: bytes, where: str = "<bytes>") -> dict[str, bytes]:
    """Like :func:`image_member` for bytes already in memory (``where`` names their origin in errors)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            _check_decodes(image)
    except UnidentifiedImageError:
        raise SkipRecord(UNREADABLE_IMAGE, f"{where}: not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise SkipRecord(UNREADABLE_IMAGE, f"{where}: {error}") from None
    if fmt == "JPEG":
        return {"jpg": data}
    if fmt == "PNG":
        return {"png": data}
    with Image.open(io.BytesIO(data)) as image:
        return {"jpg": encode_jpeg(image)}


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def pil_member(image: Image.Image, fmt: str = "png") -> dict[str, bytes]:
    """The member for an image generated in memory (ShapesWorld): ``png`` (lossless, the default) or ``jpg``."""
    if fmt == "jpg":
        return {"jpg": encode_jpeg(image)}
    if fmt != "png":
        raise ValueError(f"image format must be 'png' or 'jpg', got {fmt!r}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"png": buffer.getvalue()}


def frames_members(frames: list[Image.Image]) -> dict[str, bytes]:
    """``frame0.jpg`` ... for a list of PIL frames (already sampled)."""
    return {f"frame{index}.jpg": encode_jpeg(frame) for index, frame in enumerate(frames)}


def uniform_indices(frame_count: int, num_frames: int) -> list[int]:
    """Centres of ``num_frames`` equal segments of ``frame_count`` frames (repeats when the video is shorter)."""
    if frame_count <= 0 or num_frames <= 0:
        raise ValueError(f"need frames to sample: frame_count={frame_count}, num_frames={num_frames}")
    return [min(frame_count - 1, int((index + 0.5) * frame_count / num_frames)) for index in range(num_frames)]


def video_members(
    path: str | Path, num_frames: int, start: float | None = None, end: float | None = None
) -> dict[str, bytes]:
    """``num_frames`` uniformly sampled frames of the video at ``path`` (optionally of the [start, end] seconds).

    Two passes with PyAV: the first counts the video packets (no decoding), the second decodes and keeps only the
    chosen frames, so a long video never sits in memory. If the decoder yields fewer frames than packets, the
    missing positions repeat the last decoded frame.
    """
    import av  # imported here: only video datasets need FFmpeg

    path = Path(path)
    if not path.is_file():
        raise SkipRecord(MISSING_VIDEO, str(path))

    def in_window(time: float | None) -> bool:
        if time is None:
            return True
        return (start is None or time >= start) and (end is None or time <= end)

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            base = stream.time_base
            count = 0
            for packet in container.demux(stream):
                if packet.size and in_window(None if packet.pts is None else float(packet.pts * base)):
                    count += 1
        if count == 0:
            window = "" if start is None and end is None else f" in [{start}, {end}] s"
            raise SkipRecord(UNREADABLE_VIDEO, f"{path}: no video frames{window}")
        wanted = uniform_indices(count, num_frames)
        chosen: dict[int, Image.Image] = {}
        last_frame = None
        with av.open(str(path)) as container:
            position = 0
            for frame in container.decode(container.streams.video[0]):
                if not in_window(frame.time):
                    continue
                if position in wanted:
                    chosen[position] = frame.to_image()
                last_frame = frame
                position += 1
                if position > wanted[-1]:
                    break
    except SkipRecord:
        raise
    except (av.FFmpegError, OSError, IndexError, ValueError) as error:
        raise SkipRecord(UNREADABLE_VIDEO, f"{path}: {error}") from None
    if last_frame is None:
        raise SkipRecord(UNREADABLE_VIDEO, f"{path}: no frame decodes")
    fill = None if len(chosen) == len(set(wanted)) else last_frame.to_image()
    frames = [chosen.get(index, fill) for index in wanted]
    return frames_members(frames)
