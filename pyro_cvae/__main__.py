from .cli import app

app(prog_name="pyro-cvae")
