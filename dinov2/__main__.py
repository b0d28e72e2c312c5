from dinov2.cli import run

run()
