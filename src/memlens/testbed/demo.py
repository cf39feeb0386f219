from pathlib import Path
import typer
def demo_command(out: Path = typer.Option(..., "--out")) -> None:
    raise NotImplementedError
