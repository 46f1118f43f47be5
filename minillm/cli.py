"""``minillm <command>``: the command-line entry point.

Each command lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``minillm --help`` is fast and a command whose
optional dependencies are missing fails alone, with a message naming what is missing.

Scope: dispatch, and the one top-level error handler: a runtime error prints one line
``minillm <command>: error: <Type>: <message>`` on stderr and exits 1 (the traceback too under
``--debug`` anywhere on the command line or ``MINILLM_DEBUG=1``); Ctrl-C exits 130. Usage
errors (argparse, including numbers out of range) exit 2. Flags are never prefix-matched
(``allow_abbrev=False``: ``--max-step`` is an error, not ``--max-steps``). An ``--out-dir`` is
checked writable before the command runs (``checkpoint.check_output_dir``).
Source: argparse (Python standard library) sub-commands; no exec-style configuration.
Deviations: none.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("minillm.train.pretrain", "train the BPE tokenizer and a base GPT on a text corpus"),
    "sft": ("minillm.train.sft", "instruction-tune a base checkpoint (full, --lora or --qlora)"),
    "reward": ("minillm.train.reward", "train a Bradley-Terry reward model on preference pairs"),
    "ppo": ("minillm.train.ppo", "RLHF with PPO and a per-token KL penalty to the SFT model"),
    "dpo": ("minillm.train.dpo", "direct preference optimization"),
    "grpo": ("minillm.train.grpo", "GRPO with verifiable rewards (group-relative advantages, no value model)"),
    "pipeline": ("minillm.pipeline", "the whole fine-tuning spectrum end to end, with one report"),
    "memory": ("minillm.memory", "memory calculator: bytes by component for full / LoRA / QLoRA"),
    "bench": ("minillm.bench", "speed and memory benchmarks (JSON)"),
    "rag": ("minillm.rag", "index a passage file and answer questions with the retrieved passage shown"),
    "datasets": ("minillm.tasks", "write the built-in task world's data files"),
    "hf": ("minillm.hf", "import/export Hugging Face GPT-2 directories"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``<prog>: error: <message> (see <prog> --help)``,
    exit status 2 (argparse's), instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-command per entry of COMMANDS (their options are parsed later)."""
    parser = OneLineParser(prog="minillm", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="--debug (anywhere) or MINILLM_DEBUG=1: print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def debug_enabled(argv: list[str]) -> bool:
    """True when ``--debug`` is on the command line or ``MINILLM_DEBUG`` is set to a true value."""
    return "--debug" in argv or os.environ.get("MINILLM_DEBUG", "").lower() in ("1", "true", "yes", "on")


def error_line(name: str, e: BaseException) -> str:
    """The one line printed for an error: ``minillm <name>: error: <Type>: <message>`` (newlines of
    the message folded into "; ")."""
    msg = "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or repr(e)
    if isinstance(e, KeyError):  # KeyError's str() is the repr of its argument
        msg = msg.strip("\"'") if len(e.args) == 1 and isinstance(e.args[0], str) else msg
    return f"minillm {name}: error: {type(e).__name__}: {msg}"


def main(argv: list[str] | None = None) -> int:
    """Run ``minillm <command> [options]``; returns the exit status (0 ok, 1 error, 2 usage/missing
    module, 130 interrupted). Errors are printed as one line on stderr (``error_line``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"minillm {name}: not available in this version ({module_name} is missing)", file=sys.stderr)
        else:
            print(f"minillm {name}: needs the Python package {e.name!r}, which is not installed "
                  f"(pip install -e '.[dev,crosscheck]' installs every optional dependency)", file=sys.stderr)
        return 2
    sub = OneLineParser(prog=f"minillm {name}", description=help_, allow_abbrev=False,
                        epilog="--debug or MINILLM_DEBUG=1: print the traceback of an error")
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        for attr in ("out_dir", "runs_dir"):
            if isinstance(getattr(args, attr, None), str):
                from minillm.checkpoint import check_output_dir

                check_output_dir(getattr(args, attr))
        from minillm import threads

        with threads.phase("train"):  # BLAS threads for this command (generation sets its own)
            return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"minillm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one top-level handler: one line, the traceback only when asked
        if debug:
            traceback.print_exc()
        print(error_line(name, e) + ("" if debug else "  [--debug shows the traceback]"), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
