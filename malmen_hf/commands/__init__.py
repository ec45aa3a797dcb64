"""
The subcommands of `malmen-hf`, one module each: `add_parser(subparsers)` adds the command with its options, and
`run(args)` carries it out (`malmen_hf/cli.py` builds the parser from [`COMMANDS`] and runs the one asked for).

These modules import only the standard library and malmen-hf's light modules, so that `--help` answers at once.
`run` checks paths, names and facts first and imports torch and transformers (seconds) only after: bad input fails at
once, before any slow work.
"""

from . import card, demo, edit, eval, push, train

COMMANDS = (demo, train, eval, card, edit, push)
"""The subcommands' modules, in the order `malmen-hf --help` lists them."""
