"""Byte-level tokenizer for the built-in presets: ids 0-255 are bytes, then BOS, EOS, PAD."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    bos_id, eos_id, pad_id = BOS, EOS, PAD
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.write_text(json.dumps({"type": "byte", "bos": BOS, "eos": EOS, "pad": PAD}, indent=1))
        return path
