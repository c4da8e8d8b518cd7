"""What every script shares: --help with defaults, checked numbers, new files, one-line errors."""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: quiet (`run` undoes it)

import argparse
import itertools
import math
import os
import re
import sys

import torch
import torch.distributed as dist


class Parser(argparse.ArgumentParser):
    """argparse: defaults in --help, errors in one line, `args.given`: the flags typed (sorted)."""
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=self.Formatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n" if is_rank_zero() else None)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        unset = object()  # parsed into markers, argparse keeps those the command line does not set
        again = super().parse_args(args, argparse.Namespace(**dict.fromkeys(vars(parsed), unset)))
        parsed.given = sorted(name for name, value in vars(again).items() if value is not unset)
        return parsed


def flag(name):  # an argparse destination as the command line spells it: lora_rank -> --lora-rank
    return "--" + name.replace("_", "-")


def number(kind=int, low=None, high=None, low_open=False):
    """An argparse type: a finite `kind` in [low, high] (low excluded when low_open)."""
    bounds = [f"{'>' if low_open else '>='} {low}"] * (low is not None)
    valid = " and ".join(bounds + [f"<= {high}"] * (high is not None)) or "finite"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {valid}")
        return value
    return parse


POSITIVE, NON_NEGATIVE, FRACTION = number(int, 1), number(int, 0), number(float, 0.0, 1.0)
SEED = number(int, 0, 2**32 - 1)  # seed * world size + rank still fits an RNG's 64 bits
WORKERS = min(4, os.cpu_count() or 1)  # --num-workers: what the machine has, up to 4
NUM_WORKERS = number(int, 0, 4 * (os.cpu_count() or 1))  # more only fork until memory runs out


def new_file(path, flag=None, companions=()):
    """path (+ `companions`) if free; if taken: refused if given (as `flag`), else name-1.ext."""
    taken = lambda p: any(os.path.exists(p + suffix) for suffix in ("", *companions))
    if flag and taken(path):
        raise ValueError(f"{flag} {path} exists and is not overwritten: give a new path")
    writable_folder(os.path.dirname(os.path.abspath(path)), flag or "the output")
    stem, ext = os.path.splitext(path)
    return next(p for k in itertools.count() if not taken(p := f"{stem}-{k}{ext}" if k else path))


def plain_name(name, flag):
    """A name that becomes a folder's (a run's): letters, digits and . _ + -, no leading dot."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*", name):
        raise ValueError(f"{flag} {name!r}: a name must be one plain folder name (letters, "
                         f"digits, . _ + -, not starting with a dot), e.g. my-run")


def writable_folder(path, flag):
    """Refuse, before any slow work, a folder (made when written) that cannot be made or written."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):  # its nearest existing folder is the one to check
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder: give a folder")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: {folder} is not writable: give a folder you can write to")


def duration(seconds):
    """Seconds as a person says them: '40 s', '7 min', '5 h 12 min', '1 day 3 h', '3 days 4 h'."""
    if seconds < 3600:
        return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"
    hours, days = seconds / 3600, seconds / 86400
    return (f"{int(hours)} h {int(seconds / 60 % 60)} min" if days < 1 else
            f"{int(days)} day{'s' if days >= 2 else ''} {int(hours % 24)} h")


class StopRequest:
    """Within it, SIGTERM and SIGINT (Ctrl-C) only set `signum`: a loop ends its step and saves."""
    def __enter__(self):
        self.signum = None
        request = lambda signum, frame: setattr(self, "signum", signum)
        self.previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def is_rank_zero():  # whether this process speaks for the run
    return os.environ.get("RANK", "0") == "0"  # RANK is set before any process group


def distributed():  # whether a process group (torchrun's) joins this process to others
    return dist.is_available() and dist.is_initialized()


def init_distributed():
    """-> (rank, world_size, device): torchrun's processes (nccl on CUDA, else gloo), or one."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world_size, device


def max_rss_bytes(ru_maxrss):  # getrusage's ru_maxrss in bytes: KiB on Linux, bytes on macOS
    return ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def shared(value):  # rank 0's value, on every rank
    if distributed():
        dist.broadcast_object_list(box := [value])
        value = box[0]
    return value


def by_rank_zero(work):
    """work() by rank 0 alone -> its result there, None elsewhere; its error raised on all ranks."""
    result = failure = None
    if is_rank_zero():
        try:
            result = work()
        except (ValueError, OSError) as error:
            failure = error
    if failure := shared(failure):
        raise failure
    return result


def run(main):
    """Runs main: ValueError, OSError, SystemExit(text): one line (rank 0), exit 1; Ctrl-C 130.
    Anything else keeps its traceback: that is a bug of ours."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except (ValueError, OSError, SystemExit, KeyboardInterrupt) as error:
        if distributed():
            dist.destroy_process_group()
        if isinstance(error, SystemExit) and not isinstance(error.code, str):
            raise
        message = error.code if isinstance(error, SystemExit) else str(error)
        if isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror}"
        if isinstance(error, KeyboardInterrupt):
            message = "interrupted: what was saved is kept"
        if is_rank_zero():
            print(message.replace("\n", " "), file=sys.stderr)
        raise SystemExit(130 if isinstance(error, KeyboardInterrupt) else 1) from None
