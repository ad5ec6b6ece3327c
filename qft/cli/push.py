"""Push an adapter folder to the Hugging Face Hub with a generated model card (method, base, data, metrics
and the command line that reproduces it). Needs a token: `hf auth login` or HF_TOKEN.

Example:

  qft push qft-out your-name/smollm2-sentiment-qlora
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qft.cli.common import console, help_of, resolve_config, user_errors
from qft.hub import PushConfig

H = help_of(PushConfig)


@user_errors
def push_command(
    adapter: Optional[str] = typer.Argument(None, help=H("adapter")),
    repo_id: Optional[str] = typer.Argument(None, help=H("repo_id")),
    token: Optional[str] = typer.Option(None, "--token", help=H("token")),
    private: Optional[bool] = typer.Option(None, "--private", help=H("private")),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help=H("commit_message")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    from qft.hub import push_adapter

    cfg = resolve_config(PushConfig, config, locals())
    sent = push_adapter(cfg.adapter, cfg.repo_id, token=cfg.token, private=cfg.private,
                        commit_message=cfg.commit_message)
    console.print(f"pushed {len(sent['files'])} files to [bold]{sent['url']}[/]", highlight=False)
