"""Reading W&B runs back: offline run folders (no network) and, when asked and possible, the W&B public API.

wandb >= 0.20 writes an offline run only as its transaction log (`run-<id>.wandb`, what `wandb sync` uploads):
no wandb-summary.json or config.yaml, and no Python reader of that log ships with it any more. The log is
LevelDB's log format (32 KiB blocks of checksummed, possibly fragmented chunks) around `Record` protobufs, which
wandb's own `wandb_internal_pb2` still parses; `_records` undoes the framing.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768  # LevelDB log block size, the framing wandb's transaction log uses
FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, kind (1 full, 2 first, 3 middle, 4 last)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class RunData:
    """What the report needs of one W&B run: identity, config, final summary, logged history and its files."""

    id: str
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # offline `files/` folders, oldest first (one per resume)
    source: str = "offline"

    def file(self, name: str) -> Path | None:
        """Return the newest local copy of a file saved with `run.save` (e.g. "curves.npz"), if any."""
        for folder in reversed(self.files):
            path = folder / name
            if path.exists():
                return path
        return None


def _records(path: Path):
    """Yield the protobuf records of a wandb transaction log, skipping a torn chunk at the end (a killed run)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _, _ = FILE_HEADER.unpack_from(data)
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + CHUNK_HEADER.size:pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _apply(target: dict, items) -> None:
    """Apply wandb config/summary/history items (`key` or `nested_key` path, JSON value) to a dict."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)


def _read_log(log: Path, run: RunData) -> None:
    """Add one offline run folder's records (a run resumed offline has one folder per session) to `run`."""
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            run.name, run.group, run.job_type = info.display_name, info.run_group, info.job_type
            run.tags = list(info.tags)
            _apply(run.config, info.config.update)
        elif kind == "config":
            _apply(run.config, record.config.update)
        elif kind == "summary":
            _apply(run.summary, record.summary.update)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item)
            run.history.append(row)
    run.files.append(log.parent / "files")


def offline_runs(roots: list[Path]) -> list[RunData]:
    """Return every offline run in or under `roots` (searched recursively), sessions of one run id merged in
    order."""
    found = {f for root in map(Path, roots) for f in [root, *root.rglob("offline-run-*")]}
    folders = sorted((f for f in found if f.is_dir() and f.name.startswith("offline-run-")),
                     key=lambda f: f.name)  # offline-run-<YYYYmmdd_HHMMSS>-<id>: by name is by start time
    runs: dict[str, RunData] = {}
    for folder in folders:
        logs = list(folder.glob("run-*.wandb"))
        if len(logs) == 1:  # a folder without its log (a run killed while starting) holds nothing to read
            run_id = logs[0].stem[len("run-"):]
            _read_log(logs[0], runs.setdefault(run_id, RunData(run_id)))
    return list(runs.values())


def api_available() -> bool:
    """Return whether the W&B API may be tried: a key is set and nothing asks for offline work."""
    return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") not in ("offline", "disabled")


def online_runs(project: str, group: str | None, timeout: int = 20) -> list[RunData]:
    """Return the runs of `project` (entity/project or project), of one group if given, through the public API;
    their curves.npz files are downloaded to a temporary folder."""
    import tempfile

    import wandb

    api = wandb.Api(timeout=timeout)
    cache = Path(tempfile.mkdtemp(prefix="tea-lightning-report-"))
    found = []
    for remote in api.runs(project, filters={"group": group} if group else None):
        files = cache / remote.id
        for name in ("curves.npz",):
            try:
                remote.file(name).download(root=str(files), replace=True)
            except Exception:  # noqa: BLE001 - a run without curves still has its table row
                pass
        history = [dict(row) for row in remote.scan_history()]
        found.append(RunData(remote.id, remote.name, remote.group or "", remote.job_type or "", list(remote.tags),
                             dict(remote.config), dict(remote.summary._json_dict), history, [files], "online"))
    return found
