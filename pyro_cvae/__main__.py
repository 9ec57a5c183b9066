"""``python -m pyro_cvae`` and the ``pyro-cvae`` command: Ctrl-C while the (heavy) imports run
ends in one line, not a traceback."""

import sys


def main() -> None:
    try:
        from .cli import app
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) while starting; nothing was changed.", file=sys.stderr)
        sys.exit(130)
    app(prog_name="pyro-cvae")


if __name__ == "__main__":
    main()
