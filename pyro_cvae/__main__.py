"""``python -m pyro_cvae`` and the ``pyro-cvae`` command. A termination signal (Ctrl-C, SIGTERM,
SIGHUP) is recorded from the first line on, so that one arriving while the (heavy) imports run is
neither lost nor swallowed by an import: the command ends on it in one line, nothing changed."""

import signal


def main() -> None:
    pending: list[int] = []
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: pending.append(signum))
    from .cli import app
    from .console import record_termination

    record_termination(pending)  # raised by the command as it starts (cli._friendly)
    app(prog_name="pyro-cvae")


if __name__ == "__main__":
    main()
