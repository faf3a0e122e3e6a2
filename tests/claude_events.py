"""Claude Code hook payloads built from the hooks reference (code.claude.com/docs/en/hooks).

One payload per event, with the fields the reference documents for it: the common input fields
(``session_id``, ``transcript_path``, ``cwd``, ``permission_mode``, ``hook_event_name``) plus the
event's own.  ``EXPECTED`` says what each event must leave in the journal; the event table tests
drive every row through ``completionctl hook`` and through the HTTP hook endpoint.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

# event -> its own fields (beyond the common ones), as the reference documents them
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "SessionStart": {"source": "startup", "model": "claude-sonnet-4-5"},
    "UserPromptSubmit": {"prompt": "Validate the login form"},
    "PreToolUse": {
        "tool_name": "Bash",
        "tool_input": {"command": "pytest -q", "description": "run the tests"},
        "tool_use_id": "toolu_01",
    },
    "PermissionRequest": {
        "tool_name": "Bash",
        "tool_input": {"command": "rm -rf build"},
        "permission_suggestions": [{"type": "addRules", "behavior": "allow"}],
    },
    "PostToolUse": {
        "tool_name": "Write",
        "tool_input": {"file_path": "/srv/app/form.py", "content": "print(1)"},
        "tool_response": {"filePath": "/srv/app/form.py", "success": True},
        "tool_use_id": "toolu_02",
    },
    "PostToolUseFailure": {
        "tool_name": "Bash",
        "tool_input": {"command": "pytest -q"},
        "tool_use_id": "toolu_03",
        "error": "Command exited with non-zero status code 1",
        "is_interrupt": False,
    },
    "Notification": {
        "message": "Claude needs your permission to use Bash",
        "title": "Permission needed",
        "notification_type": "permission_prompt",
    },
    "SubagentStart": {"agent_id": "agent-abc", "agent_type": "Explore"},
    "SubagentStop": {
        "stop_hook_active": False,
        "agent_id": "agent-abc",
        "agent_type": "Explore",
        "agent_transcript_path": "/tmp/subagent.jsonl",
        "last_assistant_message": "The form lives in form.py.",
    },
    "TaskCompleted": {
        "task_id": "task-001",
        "task_subject": "Write the tests",
        "task_description": "Cover the email validation",
    },
    "TeammateIdle": {"teammate_name": "researcher", "team_name": "form-team"},
    "PreCompact": {"trigger": "auto", "custom_instructions": ""},
    "PostCompact": {"trigger": "auto", "compact_summary": "The form is validated."},
    "Stop": {
        "stop_hook_active": False,
        "last_assistant_message": "The login form validates email and password now.",
    },
    "StopFailure": {
        "error": "rate_limit",
        "error_details": "429 Too Many Requests",
        "last_assistant_message": "",
    },
    "SessionEnd": {"reason": "prompt_input_exit"},
}

# What each event leaves for a started todo: ("heartbeat"|"waiting"|"completion"|"ignored").
EXPECTED: dict[str, str] = {
    "SessionStart": "start",
    "UserPromptSubmit": "heartbeat",
    "PreToolUse": "heartbeat",
    "PermissionRequest": "waiting",
    "PostToolUse": "heartbeat",
    "PostToolUseFailure": "heartbeat",
    "Notification": "waiting",
    "SubagentStart": "heartbeat",
    "SubagentStop": "heartbeat",
    "TaskCompleted": "heartbeat",
    "TeammateIdle": "heartbeat",
    "PreCompact": "heartbeat",
    "PostCompact": "heartbeat",
    "Stop": "completion",
    "StopFailure": "failure-noted",
    "SessionEnd": "completion",
}


def event(name: str, session_id: str, cwd: str, transcript: str, **overrides: Any) -> dict:
    data: dict[str, Any] = {
        "session_id": session_id,
        "transcript_path": transcript,
        "cwd": cwd,
        "permission_mode": "default",
        "hook_event_name": name,
    }
    data.update(json.loads(json.dumps(EVENT_FIELDS[name])))
    data.update(overrides)
    if name == "SessionEnd":
        data.pop("permission_mode")  # the reference's SessionEnd input has no permission_mode
    return data


def post(url: str, body: bytes, token: str | None, timeout: float = 10.0) -> tuple[int, bytes]:
    """POST like Claude Code's HTTP hook does; returns (status, body)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
