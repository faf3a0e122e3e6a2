"""Git's view of a session's working directory: its HEAD, and what changed since.

Every git call runs with a timeout, without the user's hooks, pager, fsmonitor, external diff or
textconv drivers, without taking optional locks, never prompting, and as the owner of the working
directory (the session's user) when the agent runs as root. Only names and line counts are read,
never contents, and the output is bounded.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from agent.session_report import GitEvidence

TIMEOUT = 10.0
MAX_OUTPUT = 256 * 1024
MAX_STAT_LINES = 60
_SAFE_CONFIG = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.pager=cat",
    "-c", "core.fsmonitor=false",
    "-c", "diff.external=",
    "-c", "core.quotePath=false",
    "--no-pager",
)  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_OPTIONAL_LOCKS="0",
        GIT_PAGER="cat",
        PAGER="cat",
        LC_ALL="C",
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def _git(cwd: str, *args: str, timeout: float = TIMEOUT, uid: int | None = None) -> bytes:
    """Run git in `cwd` as the session's user (`uid`, else the directory's owner) when the
    agent runs as root; OSError or subprocess errors on failure."""
    user: int | None = None
    group: int | None = None
    extra: list[int] | None = None
    if os.geteuid() == 0:
        st = os.stat(cwd)
        owner = uid if uid is not None else st.st_uid
        if owner != 0:  # root serves someone else's session: git runs as that user
            try:
                gid = pwd.getpwuid(owner).pw_gid
            except KeyError:
                gid = st.st_gid
            user, group, extra = owner, gid, []
    result = subprocess.run(
        ["git", *_SAFE_CONFIG, *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        user=user,
        group=group,
        extra_groups=extra,
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, args, result.stdout, result.stderr)
    return result.stdout[:MAX_OUTPUT]


def head(cwd: str, *, uid: int | None = None) -> str | None:
    """The commit HEAD names in `cwd`, or None (not a repository, no commit yet, git missing);
    `uid` as for `_git`."""
    try:
        out = _git(cwd, "rev-parse", "--verify", "-q", "HEAD", timeout=5.0, uid=uid)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.decode("ascii", "replace").strip()
    return text or None


def evidence(cwd: str | None, base: str | None, *, uid: int | None = None) -> GitEvidence:
    """What changed in `cwd` since `base` (committed since plus uncommitted, and new untracked
    files); a GitEvidence with `missing` set when git cannot say."""
    if not cwd or not os.path.isdir(cwd):
        return GitEvidence(None, missing="no_workdir")
    try:
        root = _git(cwd, "rev-parse", "--show-toplevel", uid=uid).decode("utf-8", "replace").strip()
    except subprocess.TimeoutExpired:
        return GitEvidence(None, missing="git_timeout")
    except (OSError, subprocess.SubprocessError):
        return GitEvidence(None, missing="not_a_repository")
    against = base or head(cwd, uid=uid)
    if against is None:
        return GitEvidence(None, root=root, missing="no_commit")
    try:
        numstat = _git(cwd, "diff", "--numstat", "-z", "--no-color", "--no-ext-diff",
                       "--no-textconv", "--no-renames", against, "--", uid=uid)  # fmt: skip
        stat = _git(cwd, "diff", "--stat=100", "--no-color", "--no-ext-diff", "--no-textconv",
                    "--no-renames", against, "--", uid=uid)  # fmt: skip
        untracked = _git(cwd, "ls-files", "-z", "--others", "--exclude-standard", uid=uid)
    except subprocess.TimeoutExpired:
        return GitEvidence(against, root=root, missing="diff_timeout")
    except (OSError, subprocess.SubprocessError) as exc:
        return GitEvidence(
            against, root=root, missing="diff_failed", missing_detail=type(exc).__name__
        )
    changed: list[str] = []
    for record in numstat.split(b"\0"):
        parts = record.split(b"\t", 2)
        if len(parts) == 3 and parts[2]:
            changed.append(parts[2].decode("utf-8", "replace"))
    new = [p.decode("utf-8", "replace") for p in untracked.split(b"\0") if p]
    lines = stat.decode("utf-8", "replace").splitlines()
    omitted = 0
    if len(lines) > MAX_STAT_LINES:
        omitted = len(lines) - MAX_STAT_LINES + 1
        lines = lines[: MAX_STAT_LINES - 1]
    return GitEvidence(
        base,
        sorted({*changed, *new}),
        lines,
        root=str(Path(root)),
        untracked=new[:MAX_STAT_LINES],
        stat_omitted=omitted,
        base_unknown=base is None,
    )
