"""The model a session's agent uses: its config option of category ``model``, within the admin's list.

Agents offer their models as an ACP session config option (``session/set_config_option``) whose
``category`` is ``model`` (Qwen Code, Claude Code, Codex, the demo). The admin may narrow the
list per agent (``c.UserSessionManager.allowed_models``): clients only see the allowed values,
a user's switch to another is refused, and an agent that starts on a model outside the list is
switched to the first allowed one (``wanted``).
"""

from __future__ import annotations

from typing import Any

from .errors import ModelNotAllowed


def _values(option: dict[str, Any]) -> list[dict[str, Any]]:
    """A select option's choices, groups flattened."""
    out = []
    for item in option.get("options") or []:
        if isinstance(item, dict) and isinstance(item.get("options"), list):  # a group
            out += [o for o in item["options"] if isinstance(o, dict)]
        elif isinstance(item, dict):
            out.append(item)
    return out


def model_option(options: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The config option of category ``model`` (None: the agent offers no model choice)."""
    return next((o for o in options if o.get("category") == "model" and o.get("type", "select") == "select"),
                None)


class ModelChoice:
    """One session's model choice; ``allowed`` None: every model the agent offers."""

    def __init__(self, allowed: list[str] | None) -> None:
        self.allowed = allowed

    def permits(self, value: Any) -> bool:
        return self.allowed is None or value in self.allowed

    def narrow(self, options: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The config options as clients see them: the model option's choices narrowed."""
        if self.allowed is None:
            return options
        out = []
        for option in options:
            if option is model_option(options):
                items = []
                for item in option.get("options") or []:
                    if isinstance(item, dict) and isinstance(item.get("options"), list):
                        kept = [o for o in item["options"]
                                if isinstance(o, dict) and self.permits(o.get("value"))]
                        if kept:
                            items.append({**item, "options": kept})
                    elif isinstance(item, dict) and self.permits(item.get("value")):
                        items.append(item)
                option = {**option, "options": items}
            out.append(option)
        return out

    def check(self, options: list[dict[str, Any]], config_id: str, value: Any) -> None:
        """Refuse a switch to a model the admin does not allow."""
        option = model_option(options)
        if option is not None and option.get("id") == config_id and not self.permits(value):
            raise ModelNotAllowed(f"The model {value!r} is not allowed here; choose one of: "
                                  f"{', '.join(map(str, self.allowed or []))}")

    def wanted(self, options: list[dict[str, Any]], preferred: Any = None) -> tuple[str, Any] | None:
        """(config id, value) to switch to, or None: ``preferred`` (the model the session used
        before it was resumed) when the agent offers it and it is allowed, else the first
        allowed model when the current one is not."""
        option = model_option(options)
        if option is None or not isinstance(option.get("id"), str):
            return None
        current = option.get("currentValue")
        values = [v.get("value") for v in _values(option)]
        if preferred is not None and preferred != current and preferred in values and self.permits(preferred):
            return option["id"], preferred
        if not self.permits(current):
            first = next((v for v in values if self.permits(v)), None)
            if first is not None:
                return option["id"], first
        return None

    def model(self, options: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The ``models`` field of the session model (docs/api.md), from the narrowed options."""
        option = model_option(options)
        if option is None:
            return None
        return {"config_id": option.get("id"), "current": option.get("currentValue"),
                "available": [{"value": v.get("value"), "name": v.get("name") or v.get("value"),
                               "description": v.get("description")} for v in _values(option)]}
