"""``minillm <command>``: the command-line entry point.

Each command lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``minillm --help`` is fast and a command whose
optional dependencies are missing fails alone, with a message naming what is missing.

Scope: dispatch only; every command's options come from its config dataclass.
Source: argparse (Python standard library) sub-commands; no exec-style configuration.
Deviations: none.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    "datasets": ("minillm.tasks", "write the built-in task world's data files"),
    "hf": ("minillm.hf", "import/export Hugging Face GPT-2 directories"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-command per entry of COMMANDS (their options are parsed later)."""
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``minillm <command> [options]``; returns the exit status (0 ok, 2 usage/missing module)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    sub = argparse.ArgumentParser(prog=f"minillm {name}", description=help_)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
