"""Shared CLI plumbing: one-line errors, YAML configs merged under command-line flags."""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console

from qft.errors import QftError, QftInterrupted

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2, label: str = "error"):
    err_console.print(f"[bold red]{label}:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _Terminated(BaseException):
    """SIGTERM outside training (where qft.robust.StopOnSignal handles it), turned into a clean exit."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def user_errors(fn):
    """Run a command; a QftError (or Ctrl-C, or SIGTERM) ends it with one line and a non-zero exit, never a
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            return fn(*args, **kwargs)
        except QftInterrupted as exc:
            fail(str(exc), code=exc.exit_code, label="interrupted")
        except QftError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted; nothing already saved was changed", code=130, label="interrupted")
        except _Terminated:
            fail("terminated; nothing already saved was changed", code=143, label="interrupted")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def load_yaml(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.exists():
        raise QftError(f"config file {path} does not exist", "check the --config path")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise QftError(f"config file {path} is not valid YAML{where}", "fix the YAML syntax") from exc
    if not isinstance(values, dict):
        raise QftError(f"config file {path} must be a mapping of option: value", "write one `key: value` per line")
    return {k.replace("-", "_"): v for k, v in values.items()}


def help_of(cls):
    """``H(name)`` -> the help text of config field ``name``: one source of truth for CLI, YAML and Python."""
    fields = {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
    return fields.__getitem__


def resolve_config(cls, config: Path | None, flags: dict):
    """``cls`` from a YAML file overridden by the flags given (not None); unknown keys name the closest option."""
    from qft.config import config_from_dict

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in flags.items() if v is not None and k in names}
    return config_from_dict(cls, {**load_yaml(config), **given})


def with_yaml_defaults(ctx, config: Path | None, values: dict) -> dict:
    """Options of a command from ``--config FILE.yaml``, overridden by flags the user actually typed.

    ``ctx`` is the typer/click context: it tells which values came from the command line and which are
    defaults, so a YAML value replaces only a default. Unknown YAML keys name the closest option.
    """
    import difflib

    given = load_yaml(config)
    names = set(values) - {"config", "ctx"}
    for key in given:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise QftError(f"unknown config key {key!r}",
                           f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(names))}")
    out = {k: v for k, v in values.items() if k in names}
    for key, value in given.items():
        source = ctx.get_parameter_source(key)  # by name: typer may ship its own copy of click's enum
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            out[key] = value
    return out
