"""Reading TensorBoard event files back in tests, with tensorboardX's protos (no tensorboard needed)."""
from __future__ import annotations

import struct
from pathlib import Path


def read_events(directory: Path) -> list:
    """Every event of the TFRecord files under ``directory`` (length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def scalars(events: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out
