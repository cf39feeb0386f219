"""The `memlens` command line. Thin: every command is a call into a module that does the work.

Sub-commands live next to the code they drive and are mounted here, so this file stays a table of contents.
"""

from __future__ import annotations

import os
import sys

import typer

from memlens.errors import MemlensError

app = typer.Typer(
    name="memlens",
    help="Find, outline and remove training-data memorization in text-to-image diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _mount() -> None:
    # Imported here rather than at module top so `memlens --help` stays fast and one broken room does not hide the
    # others' commands.
    from memlens.testbed.cli import app as testbed_app
    from memlens.testbed.demo import demo_command

    app.add_typer(testbed_app, name="testbed", help="The model organism: make its data, train it.")
    app.command("demo", help="Run the shipped model organism offline and write pictures and summary.json.")(
        demo_command
    )
    try:
        from memlens.scan import scan_command

        app.command("scan", help="Generate for a prompt file and record BE maps and magnitudes per image.")(
            scan_command
        )
    except ImportError:
        pass
    try:
        from memlens.evaluate import app as evaluate_app

        app.add_typer(evaluate_app, name="evaluate", help="Detection, localization and similarity metrics.")
    except ImportError:
        pass
    try:
        from memlens.report import report_command

        app.command("report", help="Write one self-contained HTML page for a scan directory.")(report_command)
    except ImportError:
        pass
    try:
        from memlens.mitigation.cli import mitigate_command

        app.command("mitigate", help="Generate with inference-time mitigation and record what changed.")(
            mitigate_command
        )
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a `MemlensError` becomes one line on stderr and exit status 2."""
    # transformers warns at import about optional image-processor backends memlens never uses; keep the terminal
    # for what the user asked about. An explicit TRANSFORMERS_VERBOSITY still wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as transformers_logging

    # Loading a few-MB model needs no progress bar of its own; memlens shows progress for the work itself.
    transformers_logging.disable_progress_bar()
    _mount()
    try:
        app(args=argv, standalone_mode=False)
    except MemlensError as err:
        print(f"memlens: error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as ex:  # raised by commands that exit early on purpose
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:
        print("memlens: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as ex:  # usage errors (bad option values): a message, not a traceback
        # Recent Typer releases raise their own vendored copy of click's exceptions, which are not
        # click.ClickException; both kinds carry click's `show()` and `exit_code`.
        if callable(getattr(ex, "show", None)) and isinstance(getattr(ex, "exit_code", None), int):
            ex.show()
            sys.exit(ex.exit_code)
        raise


if __name__ == "__main__":
    main()
