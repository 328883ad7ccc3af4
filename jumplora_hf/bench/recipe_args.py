"""The benchmark recipes' command line, parsed before anything heavy is imported.

`recipes/sc.py --help` lists the recipe's own flags and the adapters' (`JumpLoraArguments`) without importing
torch; `--help-all` adds every flag of `ContinualConfig` (the Trainer's). A user error (unknown flag, bad
value, no data folder, unknown order) prints one message and a short usage line, and exits with status 2 before
anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field

from ..arguments import JumpLoraArguments
from ..methods import METHODS

AUTO = "<auto>"
DATA_DIR_ENV = "JUMPLORA_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("data", "cl_benchmark")
GET_DATA = (
    "Build it from the Hub with `python recipes/build_cl_benchmark.py --out_dir {default}` (the paper's split of all "
    "15 datasets), or point --data_dir (or ${env}) at an existing folder in the layout <task>/{{train,dev,test,"
    "labels}}.json"
)


class RecipeError(Exception):
    """A user error of the recipes: printed as one message with a short usage line, exit status 2."""


@dataclass
class RecipeArguments:
    """What to train on, where the model is, and what to write besides the run's reports."""

    model_name_or_path: str = field(
        default="google-t5/t5-large", metadata={"help": "Hub id or local folder of the base model."}
    )
    data_dir: str = field(
        default=AUTO,
        metadata={
            "help": f"Benchmark folder <task>/{{train,dev,test,labels}}.json (default: ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})."
        },
    )
    order: str = field(
        default="order1",
        metadata={"help": "An order of the folder's orders.json (order1-order6) or comma-separated task names."},
    )
    eval_split: str = field(
        default="dev", metadata={"help": "'dev' to tune, 'test' to report.", "choices": ["dev", "test"]}
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Subsample each task's training split (small runs)."}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Subsample each task's evaluation split (small runs)."}
    )
    save_merged: bool = field(
        default=True,
        metadata={"help": "Save the final merged model to <output_dir>/merged (a plain transformers checkpoint)."},
    )
    small: bool = field(
        default=False,
        metadata={
            "help": (
                "A small offline run of a few minutes: the model `make demo` converts (models/SmolLM2-135M-Instruct), "
                "q_proj/v_proj, 16 training and 16 evaluation examples and 2 steps per task, batch 8, source 128 "
                "tokens, into runs/small/...; any of these given explicitly wins."
            )
        },
    )
    single_task_dir: str = field(
        default=AUTO,
        metadata={
            "help": (
                "Run dir of a --single_task_baselines run of the same tasks, whose accuracies a0 give FWT; default: "
                "runs/<order>/single_task/seed<seed> when it has finished every task. 'none' to skip FWT."
            )
        },
    )


def resolve_data_dir(data_dir: str) -> str:
    return os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR) if data_dir == AUTO else data_dir


def check_data(data_dir: str, order: str) -> list[str]:
    """The task names of `order` in `data_dir`; a RecipeError that says how to get the data otherwise."""
    hint = GET_DATA.format(default=DEFAULT_DATA_DIR, env=DATA_DIR_ENV)
    if not os.path.isdir(data_dir):
        raise RecipeError(f"no benchmark folder at {data_dir!r}. {hint}")
    orders_path = os.path.join(data_dir, "orders.json")
    orders = {}
    if os.path.exists(orders_path):
        with open(orders_path, encoding="utf-8") as f:
            orders = json.load(f)
    if order in orders:
        return list(orders[order])
    tasks = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    names = [t for t in order.split(",") if t]
    missing = [n for n in names if n not in tasks]
    if missing or not names:
        valid = ", ".join(sorted(orders)) if orders else "(none: the folder has no orders.json)"
        raise RecipeError(
            f"--order {order!r} is neither an order of {data_dir} nor a comma-separated list of its tasks. "
            f"Valid orders: {valid}; tasks: {', '.join(tasks) or '(none)'}"
        )
    return names


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_dataclass(group, cls, defaults: dict) -> None:
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args and type(None) in args else kind
        options = {"default": defaults.get(f.name, f.default), "help": f.metadata.get("help", ""), "dest": f.name}
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if typing.get_origin(base) is list:
            options.update(nargs="+", type=typing.get_args(base)[0])
        elif base is bool:
            options.update(type=_str2bool, nargs="?", const=True, metavar="{true,false}")
        else:
            options["type"] = base
        group.add_argument(f"--{f.name}", **options)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise RecipeError(message)


def light_parser(prog: str, description: str, default_order: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("-h", "--help", action="store_true", help="show the recipe's flags and exit")
    parser.add_argument("--help-all", action="store_true", help="also list every ContinualConfig / Trainer flag")
    _add_dataclass(parser.add_argument_group("recipe"), RecipeArguments, {"order": default_order})
    _add_dataclass(
        parser.add_argument_group("adapters (JumpLoraArguments)"), JumpLoraArguments, RECIPE_ADAPTER_DEFAULTS
    )
    training = parser.add_argument_group(
        "training (ContinualConfig: every Seq2SeqTrainingArguments flag too; --help-all lists them)",
        f"  --method {{{','.join(METHODS)}}}   --ella_lambda λ [λ ...] | auto   --tau_lr_multiplier M\n"
        "  --olora_lambda1 λ1   --osf_max_preserved_fraction F (osf: 0 < F < 1)\n"
        "  --learning_rate   --per_device_train_batch_size   --num_train_epochs   --seed   --output_dir",
    )
    del training
    return parser


# The paper's adapters (§4.4): r 8, α 32 on q and v (T5's names).
RECIPE_ADAPTER_DEFAULTS = {"jumplora_target_modules": ["q", "v"]}


def short_usage(prog: str) -> str:
    return (
        f"usage: {prog} [--order ORDER] [--method METHOD] [--data_dir DIR] [--model_name_or_path M] [flags...] | "
        f"{prog} CONFIG.yaml   (--help: the recipe's flags; --help-all: every flag)"
    )


def split_config_file(path: str) -> tuple[dict, dict, dict]:
    """A YAML/JSON file of flags, split into (recipe, adapters, training) keys."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            given = yaml.safe_load(f) or {}  # JSON is YAML
    except (OSError, yaml.YAMLError) as error:
        raise RecipeError(f"cannot read {path}: {error}") from None
    if not isinstance(given, dict):
        raise RecipeError(f"{path} must hold a mapping of flag names to values")
    recipe_keys = {f.name for f in _fields(RecipeArguments)}
    adapter_keys = {f.name for f in _fields(JumpLoraArguments)}
    recipe = {k: v for k, v in given.items() if k in recipe_keys}
    adapters = {k: v for k, v in given.items() if k in adapter_keys}
    training = {k: v for k, v in given.items() if k not in recipe_keys | adapter_keys}
    return recipe, adapters, training


def parse_light(argv: list[str], prog: str, description: str, default_order: str):
    """(recipe, adapters, remaining argv or training dict, help_all). Prints the help and exits for -h/--help."""
    parser = light_parser(prog, description, default_order)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        recipe_values, adapter_values, training = split_config_file(argv[0])
        recipe = RecipeArguments(**{"order": default_order, **recipe_values})
        adapters = JumpLoraArguments(**{**RECIPE_ADAPTER_DEFAULTS, **adapter_values})
        return recipe, adapters, training, False
    namespace, rest = parser.parse_known_args(argv)
    if namespace.help and not namespace.help_all:
        parser.print_help()
        sys.exit(0)
    values = vars(namespace)
    recipe = RecipeArguments(**{f.name: values[f.name] for f in _fields(RecipeArguments)})
    try:
        adapters = JumpLoraArguments(**{f.name: values[f.name] for f in _fields(JumpLoraArguments)})
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return recipe, adapters, rest, namespace.help_all
