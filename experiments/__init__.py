"""Launchers: `python -m experiments.NAME --config=configs/NAME.py:PRESET --workdir=DIR [--config.a.b=...]`.

A launcher is flag parsing plus one call of a stage function (lm.stages, rl.stages); `main` holds what they
share: the `--config`/`--workdir` flags, a one-line error for a bad `--config.x.y=`, joining a multi-host
run, and a clean exit on preemption. Besides the launchers: the demo pipeline (`pipeline`), its QA task
and labeler (`qa_task`), and the chat REPL (`chat`).
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
from typing import Callable, Optional

from absl import app, flags, logging

PREEMPTED_EXIT = 143  # 128 + SIGTERM, as a process killed by the signal would report


def _unknown_override(config, argv) -> Optional[str]:
    """A message naming the first `--config.a.b=` whose key the loaded config does not have, if any."""
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, done = config, []
        for part in key.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                where = ".".join(done) or "the config"
                return (f"unknown config key {key!r} in {arg!r}: {where} has no field {part!r}; "
                        f"its fields are: {', '.join(sorted(fields)) or '(none: it is a value)'}")
            node, done = node[part], done + [part]
    return None


def _load_config(argv):
    """The config that `--config=FILE[:PRESET]` in argv names (None if absent or unloadable)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, preset = spec.partition(":")
    try:
        loader = importlib.util.spec_from_file_location("_launcher_config", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module.get_config(preset) if preset else module.get_config()
    except Exception:  # the flag parser reports the config file's own errors
        return None


def parse_flags(argv):
    """absl flag parsing that turns a bad `--config.x.y=` into one clear line instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError/AttributeError/ValueError from deep inside
        config = _load_config(argv)
        message = (config is not None and _unknown_override(config, argv)) or f"{type(e).__name__}: {e}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS["verbosity"].present:  # warnings only unless asked: orbax logs every save at INFO
        flags.FLAGS.verbosity = -1
    return rest


def run(main) -> None:
    """`absl.app.run(main)` with the clear config-override errors of `parse_flags`.

    Logging defaults to warnings only, keeping the progress bar readable; `--verbosity=0` brings INFO back.
    A run preempted by SIGTERM (lm.loop.Preempted: its state is saved) exits with status 143 and one line;
    a bad config, path or checkpoint, or a run stopped for non-finite updates, exits with status 1 and one
    `error:` line (the traceback is logged at INFO: `--verbosity=0` shows it).
    """
    def guarded(argv):
        from lm.checkpoint import CheckpointError
        from lm.loop import Preempted, TrainingStopped

        try:
            return main(argv)
        except Preempted as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT)
        except (ValueError, FileNotFoundError, TrainingStopped, CheckpointError) as e:
            logging.info("traceback:\n%s", traceback.format_exc())
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded, flags_parser=parse_flags)


def main(stage: Callable[[object, str], str], example: str) -> None:
    """The whole launcher of a stage: `--config` (e.g. `example`) and `--workdir` flags, then
    `stage(config, workdir)` after joining a multi-host run (`config.distributed`)."""
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, f"Config file and preset, e.g. {example}.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer).", required=True)

    def launch(argv):
        del argv
        from lm import distributed

        distributed.initialize(config.value.distributed)
        out = stage(config.value, workdir.value)
        logging.info("%s: done, run directory %s", getattr(stage, "__name__", "stage"), out)

    run(launch)
