"""
The command-line conventions every script shares, in one place (the role nanoGPT gives configurator.py):
--help shows each flag's default; numbers say their valid range; an output path is never one that is taken;
and `run(main)`, each script's entry, turns a user's mistake into one line on stderr and a non-zero exit.

Below the scripts, functions raise ValueError or OSError saying what is wrong with the thing itself (a file, a key,
a class, a full disk); `run` prints that message once (by rank 0 under torchrun) and exits with code 1. Under
torchrun, `by_rank_zero` has rank 0 alone do a thing (write a file, take a lock) and every rank learn how it went.
"""
import argparse
import math
import os
import re
import signal
import sys

import torch.distributed as dist


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with the defaults in --help and a bad argument said in one line (exit code 2), once per torchrun."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n" if is_rank_zero() else None)

    def parse_args(self, args=None, namespace=None):
        """The arguments, and in `given` the names of those the command line itself set (not left at a default)."""
        parsed = super().parse_args(args, namespace)
        defaults, set_defaults = {action.dest: action.default for action in self._actions}, self._defaults
        self._defaults = {}  # parsed again with no defaults at all: only what the command line set is left
        for action in self._actions:
            action.default = argparse.SUPPRESS
        try:
            parsed.given = sorted(vars(super().parse_args(args)))
        finally:
            for action in self._actions:
                action.default = defaults[action.dest]
            self._defaults = set_defaults
        return parsed


def flag(name):
    """An argparse destination as the command line spells it: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")


def number(kind=int, low=None, high=None, low_open=False):
    """An argparse type: a finite `kind` in [low, high] (low excluded when low_open), the range in its message."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            valid = " and ".join(([f"{'>' if low_open else '>='} {low}"] if low is not None else [])
                                 + ([f"<= {high}"] if high is not None else [])) or "finite"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {valid}")
        return value
    return parse


POSITIVE, NON_NEGATIVE, FRACTION = number(int, 1), number(int, 0), number(float, 0.0, 1.0)
SEED = number(int, 0, 2**32 - 1)  # what every RNG takes, with room for seed * world size + rank in 64 bits
WORKERS = min(4, os.cpu_count() or 1)  # --num-workers: what the machine has, up to 4
NUM_WORKERS = number(int, 0, 4 * (os.cpu_count() or 1))  # more only fork processes until memory runs out


def new_file(path, flag=None, companions=()):
    """Where a script may write without overwriting anything: path, and path + each suffix of `companions` (files
    written beside it). A path the user gave (named by `flag`) that is taken is refused; a default one becomes
    name-1.ext, name-2.ext, ... (the first that is free)."""
    taken = lambda p: any(os.path.exists(p + suffix) for suffix in ("",) + tuple(companions))
    if flag and taken(path):
        raise ValueError(f"{flag} {path} exists and is not overwritten: give a new path, or move the old one away")
    writable_folder(os.path.dirname(os.path.abspath(path)), flag or "the output")  # (made when written)
    stem, ext = os.path.splitext(path)
    k = 0
    while taken(path):
        k += 1
        path = f"{stem}-{k}{ext}"
    return path


def plain_name(name, flag):
    """A name that becomes one folder name (a run's): letters, digits and . _ + -, not starting with a dot."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*", name):
        raise ValueError(f"{flag} {name!r}: a name must be one plain folder name (letters, digits, . _ + -, not "
                         f"starting with a dot), e.g. my-run")


def writable_folder(path, flag):
    """Refuse, before any slow work, a folder (made when written) that cannot be made or written to: its nearest
    existing folder is checked."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    check(not os.path.isdir(folder) and f"{flag} {path}: {folder} is a file, not a folder: give a folder (made if "
                                        f"missing)",
          not os.access(folder, os.W_OK) and f"{flag} {path}: {folder} is not writable (read-only, or not yours): "
                                              f"give a folder you can write to")


def check(*problems):
    """Raise a ValueError with the first of `problems` (each a message, or a false value where there is none)."""
    problem = next((problem for problem in problems if problem), None)
    if problem:
        raise ValueError(problem)


def duration(seconds):
    """Seconds as a person says them: '40 s', '7 min', '5 h 12 min', '1 day 3 h', '3 days 4 h'."""
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if seconds < 60:
        return f"{seconds:.0f} s"
    if hours < 1:
        return f"{minutes:.0f} min"
    return (f"{int(hours)} h {int(minutes % 60)} min" if days < 1
            else f"{int(days)} day{'s' if days >= 2 else ''} {int(hours % 24)} h")


class StopRequest:
    """Within it, SIGTERM (a cluster scheduler taking the node back) and SIGINT (Ctrl-C) only set `signum`, so that a
    loop can finish its step, save and exit rather than die mid-step."""
    def __enter__(self):
        self.signum = None
        request = lambda signum, frame: setattr(self, "signum", signum)
        self.previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def is_rank_zero():
    """Whether this process speaks for the run: under torchrun only rank 0 (RANK is set before any process group)."""
    return os.environ.get("RANK", "0") == "0"


def distributed():
    """Whether this process is one of several (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def by_rank_zero(work):
    """work() done by rank 0 alone (a file written, a folder locked) -> its result there, None on the other ranks.
    A ValueError or OSError it raises is raised on every rank, so that all leave together; none waits on a rank gone."""
    result, failure = None, [None]
    if not distributed() or dist.get_rank() == 0:
        try:
            result = work()
        except (ValueError, OSError) as error:
            failure = [error]
    if distributed():
        dist.broadcast_object_list(failure)
    if failure[0] is not None:
        raise failure[0]
    return result


def shared(value):
    """Rank 0's value, on every rank."""
    if distributed():
        dist.broadcast_object_list(box := [value])
        value = box[0]
    return value


def run(main):
    """A script's entry point: main() -> its result. A ValueError (what is wrong with an input), an OSError (a file
    missing or unreadable, a disk full), or a SystemExit with a message, is printed once as one line, and every rank
    leaves its process group and exits with code 1; Ctrl-C outside a loop that handles it exits with 130. A traceback
    is a bug of ours."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (each script's first line quiets it while torch loads)
    try:
        return main()
    except (ValueError, OSError, SystemExit, KeyboardInterrupt) as error:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(error, SystemExit) and not isinstance(error.code, str):
            raise
        interrupted = isinstance(error, KeyboardInterrupt)
        message = ("interrupted: what was saved is kept" if interrupted else error.code if isinstance(error, SystemExit)
                   else f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename
                   else str(error))
        if is_rank_zero():
            print(" ".join(message.split("\n")), file=sys.stderr)
        raise SystemExit(130 if interrupted else 1) from None
