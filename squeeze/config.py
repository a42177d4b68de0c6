"""Where the client finds its server and key: arguments, then ``SQUEEZE_URL`` / ``SQUEEZE_API_KEY``, then the
config file written by ``squeeze login`` (``$XDG_CONFIG_HOME/squeeze/config.json``, else ``~/.config/...``).

The file holds a secret, so it is written 0600 inside a 0700 folder, atomically (never half-written, never briefly
readable by others).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from squeeze.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "SQUEEZE_URL"
KEY_ENV = "SQUEEZE_API_KEY"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "squeeze" / "config.json"


def read_config_file(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def write_config_file(url: str, api_key: str, path: Path | None = None) -> Path:
    """Store the URL and key for later commands: 0600 file in a 0700 folder, replaced atomically."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an older tmp file's wider mode does not survive
            json.dump({"url": url, "api_key": api_key}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_config_file(path: Path | None = None) -> bool:
    path = path or config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def resolve(url: str | None = None, api_key: str | None = None) -> ClientConfig:
    """Arguments win, then the environment, then the config file; the URL defaults to a local ``squeeze serve``."""
    file: dict[str, str] | None = None
    if not url:
        url = os.environ.get(URL_ENV)
    if not api_key:
        api_key = os.environ.get(KEY_ENV)
    if not url or not api_key:
        file = read_config_file()
        url = url or file.get("url")
        api_key = api_key or file.get("api_key")
    return ClientConfig(url=(url or DEFAULT_URL).rstrip("/"), api_key=api_key or None)
