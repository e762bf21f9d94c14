"""What a rollout server's log says (this start's lines): uvicorn lost the server's port, the supervisor saw
the server command end, or a known start failure whose fix can be named. Pure text rules."""

from __future__ import annotations

import re

__all__ = ["command_exit_code", "lost_port_in_log", "start_failure_fix"]

#: ms-swift's refusal when config.json does not settle the template or model type (swift/template/register.py,
#: swift/model/model_meta.py); the candidates, when it lists them
_SWIFT_NO_MATCH = re.compile(r"Failed to automatically match `?(template_type|model_type)`? for .*?\. "
                             r"(Multiple possible types found: (\[[^\]]*\]))?")
#: coordexp.launch.supervise's line when the command it runs ended by itself
_COMMAND_EXITED = re.compile(r"\[coordexp supervise pid=\d+\] the command exited with code (-?\d+)")


def lost_port_in_log(text: str, port: int) -> bool:
    """uvicorn's failed-bind line for ``port`` is in ``text``: ``error while attempting to bind on address
    ('127.0.0.1', 8000): address already in use`` (IPv6: ``('::1', 8000, 0, 0)``)."""
    return re.search(rf"bind on address \([^)]*\b{port}\b[^)]*\): address already in use", text) is not None


def command_exit_code(text: str) -> int | None:
    """The server command's exit code from the supervisor's last "the command exited with code N" line in
    ``text`` (written as the command ends, before the supervisor stops the engine processes); None if none."""
    found = _COMMAND_EXITED.findall(text)
    return int(found[-1]) if found else None


def start_failure_fix(text: str) -> str | None:
    """The fix for a server start that failed the way ``text`` (this start's log) shows, when it is a
    known one: ms-swift could not tell the checkpoint's template or model type (a renamed folder), or the
    server environment lacks ``qwen_vl_utils`` (ms-swift's Qwen-VL image loader)."""
    found = _SWIFT_NO_MATCH.search(text)
    if found:
        choices = f" (ms-swift offers {found.group(3)})" if found.group(3) else ""
        if found.group(1) == "template_type":
            return (f"Fix: ms-swift cannot tell which chat template the checkpoint uses{choices}; name it: "
                    f"vllm.server.template=<the checkpoint's family>")
        return (f"Fix: ms-swift cannot tell the checkpoint's model type{choices}; rename the folder after "
                f"the released model it comes from, or start the server yourself with --model_type "
                f"(vllm.server.reuse_existing=true)")
    if "No module named 'qwen_vl_utils'" in text:
        return ("Fix: install ms-swift's Qwen-VL image loader into the server's environment: pip install "
                "'coordexp[server-gpu]' (it brings qwen-vl-utils)")
    return None
