"""OUT/responses.jsonl: every response saved as it is produced, so a rerun resumes.

Line 1 is a header with the settings that decide a response (generation settings, dtype); every other line is one
response ``{model, source, set, index, prompt, response, new_tokens, finished}``. On a rerun the whole file is
validated first: a file whose lines are not ours is refused (never truncated); a torn last line left by a crash
is cut off; other settings, another model under a known name, or a prompt that changed at its index are refused
with the line named, and so is a second row for the same (model, set, index) (``--overwrite`` starts afresh)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SafeshapeError
from ..io import cut_torn_tail, refuse_link, split_torn_tail

FORMAT = 1
ROW_KEYS = ("model", "source", "set", "index", "prompt", "response", "new_tokens", "finished")


class ResponseStore:
    def __init__(self, path, header: dict, overwrite: bool = False):
        self.path = Path(path)
        self.header = {"safeshape_eval_responses": FORMAT, **header}
        self.rows: dict[tuple[str, str, int], dict] = {}
        self.sources: dict[str, str] = {}
        refuse_link(self.path, "--out")  # appended to in place: never through a link
        if self.path.exists() and not overwrite and self.path.stat().st_size > 0:
            self._load()
        else:
            self._write_bytes((json.dumps(self.header) + "\n").encode(), "wb")

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete, torn = split_torn_tail(data)
        try:
            first = json.loads(complete[0] if complete else torn)
        except (json.JSONDecodeError, UnicodeDecodeError):
            first = None
        if not isinstance(first, dict) or first.get("safeshape_eval_responses") != FORMAT:
            raise SafeshapeError(f"{self.path}:1: not a safeshape eval responses file; it is left as it is: choose "
                                 "another --out (or --overwrite to replace it)")
        if first != json.loads(json.dumps(self.header)):
            diff = sorted(k for k in set(first) | set(self.header) if first.get(k) != self.header.get(k))
            raise SafeshapeError(f"{self.path}:1: these responses were made with other settings ({', '.join(diff)}: "
                                 f"{ {k: first.get(k) for k in diff} } now { {k: self.header.get(k) for k in diff} }); "
                                 "use another --out, or --overwrite to start again")
        seen: dict[tuple[str, str, int], int] = {}
        for n, line in enumerate(complete[1:], 2):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SafeshapeError(f"{self.path}:{n}: not valid JSON ({exc}); the file is left as it is") from None
            if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
                raise SafeshapeError(f"{self.path}:{n}: not a response row (needs {', '.join(ROW_KEYS)}); the file is "
                                     "left as it is")
            known = self.sources.setdefault(row["model"], row["source"])
            if known != row["source"]:
                raise SafeshapeError(f"{self.path}:{n}: model {row['model']!r} is {row['source']!r} here but "
                                     f"{known!r} earlier in the file")
            if not (isinstance(row["model"], str) and isinstance(row["set"], str) and isinstance(row["index"], int)
                    and not isinstance(row["index"], bool) and isinstance(row["response"], str)):
                raise SafeshapeError(f"{self.path}:{n}: 'model', 'set' and 'response' must be strings and 'index' an "
                                     "integer; the file is left as it is")
            key = (row["model"], row["set"], row["index"])
            if key in seen:  # an edited copy must not silently replace the response it repeats
                raise SafeshapeError(f"{self.path}:{n}: a second row for model {key[0]!r}, {key[1]} prompt {key[2]} "
                                     f"(the first is line {seen[key]}); a run never writes one twice, so the file "
                                     "was edited: it is left as it is; use another --out, or --overwrite")
            seen[key] = n
            self.rows[key] = row
        cut_torn_tail(self.path, data)

    def check_model(self, name: str, source: str) -> None:
        if name in self.sources and self.sources[name] != source:
            raise SafeshapeError(f"{self.path}: model {name!r} was {self.sources[name]!r} in the saved responses, now "
                                 f"{source!r}: rename it (--adapter NAME=PATH), use another --out, or --overwrite")

    def append(self, rows: list[dict]) -> None:
        """Append whole rows in one write, synced to disk."""
        for r in rows:
            self.rows[(r["model"], r["set"], r["index"])] = r
            self.sources.setdefault(r["model"], r["source"])
        self._write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(), "ab")

    def _write_bytes(self, data: bytes, mode: str) -> None:
        with open(self.path, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
