"""The `marco` command: thin typer commands that parse options and call one library function each.

Errors: a `MarcoError` becomes `Error: ...` (+ `Hint: ...`) on stderr with exit code 1, a usage error exit code 2,
Ctrl-C exit code 130; a traceback appears only with MARCO_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer
from typer._click import exceptions as click  # typer vendors click; its exceptions live here

from .. import __version__
from ..errors import MarcoError
from . import bench_cmd, chat_cmd, models_cmd, profile_cmd, quantize_cmd, run_cmd, ui

app = typer.Typer(
    name="marco",
    help="Run Marco-MoE language models on your own computer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"marco-local {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Run Marco-MoE language models on your own computer."""


# Commands live in their own modules; register each here.
app.command(epilog=run_cmd.EPILOG)(run_cmd.run)
app.command(epilog=bench_cmd.EPILOG)(bench_cmd.bench)
app.command(epilog=quantize_cmd.EPILOG)(quantize_cmd.quantize)
app.command(epilog=chat_cmd.EPILOG)(chat_cmd.chat)
app.command("list", epilog=models_cmd.LIST_EPILOG)(models_cmd.list_cmd)
app.command(epilog=models_cmd.PULL_EPILOG)(models_cmd.pull)
app.command(epilog=models_cmd.INFO_EPILOG)(models_cmd.info)
app.command(epilog=profile_cmd.EPILOG)(profile_cmd.profile)


def main() -> None:
    debug = os.environ.get("MARCO_DEBUG") == "1"
    try:
        # typer turns a Ctrl-C inside a command into an exit code it returns (130), and a closed stdout into exit 1
        code = app(standalone_mode=False)
    except SystemExit as e:
        if _stdout_closed(e.__context__):  # `marco run ... | head`: the reader has what it wanted
            sys.exit(0)
        raise
    except MarcoError as e:
        if debug:
            raise
        ui.error(e.message, e.hint)
        sys.exit(e.exit_code)
    except click.UsageError as e:
        ui.error(e.format_message(), f"see: marco {e.ctx.command_path.split(' ', 1)[-1] if e.ctx else ''} --help")
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    except click.ClickException as e:
        ui.error(e.format_message())
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug: say so in one line unless debugging
        if debug:
            raise
        ui.unexpected(e)
        sys.exit(1)
    if code == INTERRUPTED:
        ui.console.print("\n[dim]interrupted[/]")
    sys.exit(code if isinstance(code, int) else 0)


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


def _stdout_closed(e: BaseException | None) -> bool:
    return isinstance(e, OSError) and e.errno == errno.EPIPE
