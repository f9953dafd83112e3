"""What encoded bytes hold, from their first bytes (magic numbers), whatever the file is
called: the field's downloads include HTML error pages saved as `.mp3`."""

from __future__ import annotations

AUDIO_KINDS = ("wav", "flac", "ogg", "opus", "mp3", "mp4", "aiff")
IMAGE_KINDS = ("jpeg", "png", "webp", "tiff", "gif", "bmp")


def sniff(data: bytes | None) -> str:
    """The container or format: one of AUDIO_KINDS or IMAGE_KINDS, "html", "text", "empty"
    or "unknown"."""
    if not data:
        return "empty"
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"RF64", b"BW64"):
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "opus" if b"OpusHead" in data[:128] else "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    text = data[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in text:
        return "html"
    try:
        data[:512].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown"
