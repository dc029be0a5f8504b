"""``python -m cluster.harness up|down|list``."""
import argparse
import sys

from .cli import add_harness_arguments, run_harness_command

parser = argparse.ArgumentParser(prog="python -m cluster.harness", description=__doc__)
add_harness_arguments(parser)
sys.exit(run_harness_command(parser.parse_args()))
