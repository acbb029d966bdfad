"""The ``afire`` command line: ``afire prepare`` (more subcommands are added below)."""
from __future__ import annotations

import argparse
import sys

from .device import DeviceUnavailableError

EXIT_STATUS = """exit status:
  0    success
  2    bad arguments, unusable input or output (a one-line message on stderr says which
       file and why: missing, not writable, a directory, disk full, ...)
  3    pre-training stopped on a non-finite loss (the last checkpoint is kept)
  130  interrupted (Ctrl-C)"""

FORMATS_CLI = ("folder", "kermany", "nih", "chexpert", "mimic", "siim", "shared", "phantom")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="decode a dataset into uint8 shards for training",
        description="Decode, convert to 8-bit grayscale, resize and write memory-mappable "
                    "shards (shard_*.npy) plus manifest.jsonl. Re-running resumes: finished "
                    "shards are skipped. Unreadable files are reported and left out.",
        epilog="exit status: 0 done (files that could not be read are listed in errors.txt); "
               "2 usage, data or output error (one line on stderr); 130 interrupted "
               "(finished shards are kept)")
    p.add_argument("src", help="dataset root (for --format phantom: the number of images)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", default="folder", choices=FORMATS_CLI, dest="fmt",
                   help="source layout (default: folder)")
    p.add_argument("--size", type=int, default=224, help="output side S in pixels (224)")
    p.add_argument("--resize", default="crop", choices=("crop", "pad"),
                   help="crop: short side to S then centre crop; pad: long side to S, "
                        "black padding (default crop)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: all CPUs; 1 = no subprocesses)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (1024)")
    p.add_argument("--uncertain", default="ones", choices=("ones", "zeros", "ignore"),
                   help="CheXpert/MIMIC -1 labels: U-Ones, U-Zeros or ignore (NaN)")
    p.add_argument("--all-views", action="store_true",
                   help="CheXpert/MIMIC: keep lateral views too (default: frontal only)")
    p.add_argument("--seed", type=int, default=0, help="phantom: generator seed")
    p.add_argument("--p-abnormal", type=float, default=0.0,
                   help="phantom: probability of a lesion per image (default 0: all normal)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse source images with more pixels than this, checked from the "
                        "header before decoding (default 2^26 = 8192x8192)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from .data.prepare import phantom_records, prepare, print_summary

    options, records = {}, None
    if args.fmt in ("chexpert", "mimic"):
        options = {"uncertain": args.uncertain, "frontal_only": not args.all_views}
    if args.fmt == "phantom":
        try:
            n = int(args.src)
        except ValueError:
            raise ValueError(f"--format phantom takes the number of images as SRC, got "
                             f"{args.src!r}") from None
        if n < 0 or not 0.0 <= args.p_abnormal <= 1.0:
            raise ValueError("need SRC >= 0 and 0 <= --p-abnormal <= 1")
        records = phantom_records(n, seed=args.seed, p_abnormal=args.p_abnormal)
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    summary = prepare(args.src, args.out, fmt=args.fmt, size=args.size, workers=args.workers,
                      shard_size=args.shard_size, resize=args.resize,
                      progress=not args.quiet, records=records, **options)
    print_summary(summary)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time a training step on the GPU: afire vs PyTorch (source checkout)",
        description="Runs benchmarks/bench_gpu_vs_torch.py of the afire source tree this "
                    "package was imported from (the benchmarks are not installed with a "
                    "wheel): afire's bf16 paths vs the same step in PyTorch (eager and "
                    "torch.compile), img/s, MFU and memory as JSON. Needs torch. Options "
                    "after `--` go to the script (e.g. afire bench -- --presets vit_small).")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_gpu_vs_torch.py")
    if not os.path.exists(script):
        raise ValueError(f"afire bench needs a source checkout: {script} does not exist (the "
                         "benchmarks are not part of an installed wheel)")
    extra = [a for a in args.args if a != "--"]
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.call([sys.executable, script] + extra, env=env)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="afire", description="AFiRe self-supervised pre-training for chest X-rays",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"afire {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_prepare(sub)
    _add_bench(sub)
    # `afire.pretrain` and `afire.evaluate.*` are also the names of functions exported at package
    # level, so the modules are fetched by their dotted names
    __import__("afire.pretrain", fromlist=["add_parser"]).add_parser(sub)
    __import__("afire.evaluate.cli", fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``afire`` console script. Returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options (`--out RUN base_lr=8e-3`), which argparse leaves
    # unparsed once the positional list has been matched before the options
    if extra and hasattr(args, "overrides") and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .dist import rank_tag  # " (rank r of W)" in a multi-process run

    try:
        return args.func(args)
    except OSError as e:  # before ValueError's siblings: a file problem, said in one line
        print(f"afire {args.command}{rank_tag()}: error: {describe_os_error(e)}",
              file=sys.stderr)
        return 2
    except (ValueError, ImportError, DeviceUnavailableError, MemoryError) as e:
        print(f"afire {args.command}{rank_tag()}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; finished shards are kept, run the same command again to resume"
                if args.command == "prepare" else "")
        print(f"\nafire {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def describe_os_error(e: OSError) -> str:
    """One line with the file and the reason, without Python's "[Errno N]" prefix and
    without the file name twice (afire's own messages already contain it)."""
    reason = e.strerror or str(e)
    files = [f for f in (e.filename, e.filename2) if f is not None]
    for f in files:
        if str(f) not in reason:
            reason = f"{reason}: {f}"
    return reason


if __name__ == "__main__":
    sys.exit(main())
