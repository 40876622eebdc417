"""Build identity for response headers and snapshot hashes: COMMIT_SHA/GIT_BRANCH, else git, else unknown."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class BuildInfo:
    commit_sha: str
    git_branch: str


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value or None


def resolve_build_info(settings: Settings) -> BuildInfo:
    """Prefer the environment (set by the image build), then the checkout, then `unknown`."""
    commit = settings.commit_sha or _git("rev-parse", "HEAD") or UNKNOWN
    branch = settings.git_branch or _git("rev-parse", "--abbrev-ref", "HEAD") or UNKNOWN
    return BuildInfo(commit_sha=commit, git_branch=branch)
