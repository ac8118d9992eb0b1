"""A :class:`Source`: one checkpoint to merge, pinned (a local path, or a Hub revision at a commit)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One checkpoint to merge, pinned: a local folder, or a Hub revision at a commit."""

    name: str
    step: int | None
    path: str | None  # the local folder with the files (None until a Hub revision is fetched)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: tuple[tuple[str, int, str | None], ...] = field(default=(), compare=False)  # (name, size, sha256)

    def to_dict(self) -> dict:
        d = {"name": self.name, "step": self.step, "path": self.path}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        return d
