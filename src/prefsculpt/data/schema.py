"""The preference-pair record every stage reads.

A pair is (prompt, chosen, rejected). The prompt is either a plain string (one user turn) or a list
of chat messages ``{"role", "content"}`` ending with a user turn; chosen and rejected are the two
assistant responses. Ground-truth concept tags (known for the planted set, absent for real data)
ride along per response so every stage can be checked against them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PreferencePair:
    """One preference judgement: ``chosen`` was preferred over ``rejected`` for ``prompt``."""

    id: str
    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str
    #: Ground-truth concept tags per response, e.g. ``{"flattery": 1.0, "n_chars": 212}``.
    chosen_tags: Mapping[str, float] = field(default_factory=dict)
    rejected_tags: Mapping[str, float] = field(default_factory=dict)
    #: Anything else a source carries (task family, correct answer, original row, ...).
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def messages(self) -> list[Message]:
        """The prompt as chat messages (a plain prompt is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    def prompt_text(self) -> str:
        """A flat rendering of the prompt, stable across runs (used for hashing and display)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)

    def prompt_key(self) -> str:
        """Stable hex digest of the prompt: the unit of splitting, so a prompt never sits in two splits."""
        return hashlib.sha1(self.prompt_text().strip().encode("utf-8")).hexdigest()

    def to_record(self) -> dict[str, Any]:
        """A flat, Arrow/JSON friendly dict (prompt always as messages; tags and metadata as JSON)."""
        return {
            "id": self.id,
            "prompt": self.messages(),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_tags": json.dumps(dict(self.chosen_tags), sort_keys=True),
            "rejected_tags": json.dumps(dict(self.rejected_tags), sort_keys=True),
            "metadata": json.dumps(dict(self.metadata), sort_keys=True, default=str),
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> PreferencePair:
        """Inverse of :meth:`to_record` (also accepts already-decoded dicts)."""

        def _load(v: Any) -> dict:
            if v is None or v == "":
                return {}
            return json.loads(v) if isinstance(v, str) else dict(v)

        prompt = rec["prompt"]
        if not isinstance(prompt, str):
            msgs = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
            prompt = msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == "user" else msgs
        return cls(
            id=str(rec["id"]),
            prompt=prompt,
            chosen=rec["chosen"],
            rejected=rec["rejected"],
            chosen_tags=_load(rec.get("chosen_tags")),
            rejected_tags=_load(rec.get("rejected_tags")),
            metadata=_load(rec.get("metadata")),
        )

    def swapped(self) -> PreferencePair:
        """The same pair with the judgement reversed (used by the null variant and calibration)."""
        return PreferencePair(
            id=self.id,
            prompt=self.prompt,
            chosen=self.rejected,
            rejected=self.chosen,
            chosen_tags=self.rejected_tags,
            rejected_tags=self.chosen_tags,
            metadata={**self.metadata, "swapped": not self.metadata.get("swapped", False)},
        )
