"""``completionctl logrotate``: the logrotate file for this configuration's paths and user.

``logrotate.d/completiond`` in the repository is ready for the default paths of every user
(``~/.local/state/completion``) and parses as shipped; for a custom ``state_dir`` this command
writes the filled-in file.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from protocol.config import Config

TEMPLATE = """\
# logrotate for completiond's log files, written by `completionctl logrotate` for the
# configuration's state dir.  Install:
#   completionctl logrotate | sudo tee /etc/logrotate.d/completiond
#
# Size-based: a file is rotated once it is over 10 MB when logrotate runs.  The files are moved
# away and the agent gets SIGHUP: every process closes its file and opens a new one at the old
# path (no copytruncate, which can lose lines; nocreate: the agent creates the files, 0600).

@LOG_DIR@/agent.log @LOG_DIR@/completion.log @LOG_DIR@/monitor.log @LOG_DIR@/emergency.log {
    su @USER@ @GROUP@
    size 10M
    rotate 8
    compress
    delaycompress
    missingok
    notifempty
    nocreate
    sharedscripts
    postrotate
        # Signal only a live completiond of @USER@: the pid file is the agent user's to write,
        # and this runs as root.  Its pid must be a plain positive number, its lock held (only
        # a running agent holds it), and the process must be completiond and belong to @USER@.
        pid=$(head -c 32 "@PID_FILE@" 2>/dev/null | tr -d ' \\n')
        case "$pid" in ''|*[!0-9]*|0*) pid= ;; esac
        if [ -n "$pid" ] && ! flock -n "@PID_FILE@" true \\
            && [ "$(stat -c %U "/proc/$pid" 2>/dev/null)" = "@USER@" ] \\
            && tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \\
                | grep -Eq '(^|/| )(completiond|python[0-9.]* -m agent)( |$)'; then
            kill -HUP "$pid"
        fi
    endscript
}
"""


def render(config: Config, uid: int | None = None, gid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    return (
        TEMPLATE.replace("@LOG_DIR@", str(config.logs_dir))
        .replace("@PID_FILE@", str(config.pid_path))
        .replace("@USER@", pwd.getpwuid(uid).pw_name)
        .replace("@GROUP@", grp.getgrgid(gid).gr_name)
    )


def run(config: Config) -> int:
    sys.stdout.write(render(config))
    return 0
