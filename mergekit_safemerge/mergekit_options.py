"""The mergekit merge options ``safemerge`` reuses, declared here so that help imports no mergekit.

mergekit declares its options with ``mergekit.options.add_merge_options``, but importing that
module imports torch, transformers and PEFT (seconds). :data:`MERGE_OPTIONS` declares the subset
our commands take with mergekit's own names, flags, types, defaults, help and help headings;
:func:`mergekit_options` adds some of them to a command and hands the command mergekit's
``MergeOptions``, built from the parsed values when it runs (the contract of mergekit's
decorator); :class:`GroupedHelp` lists them under mergekit's headings, as mergekit's
``PrettyPrintHelp`` does. ``tests/test_mergekit_options.py`` checks all three against mergekit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

SCRIPT_OPTIONS = "Script Options"
"""The heading of a command's own parameters (arguments included)."""
STORAGE = "Storage"
OUTPUT = "Output Settings"
PERFORMANCE = "Performance"
DANGEROUS = "Dangerous Options"
MISCELLANEOUS = "Miscellaneous"


@dataclass(frozen=True)
class MergeOption:
    """One ``MergeOptions`` field as the click option mergekit's ``add_merge_options`` makes."""

    name: str
    flags: tuple[str, ...]
    type: type
    default: Any
    help: str
    heading: str
    show_default: bool = True
    count: bool = False

    def click_option(self) -> Callable[[Callable], Callable]:
        return click.option(
            self.name,
            *self.flags,
            type=self.type,
            default=self.default,
            help=self.help,
            show_default=self.show_default,
            count=self.count,
        )


def _switch(name: str, help: str, heading: str, default: bool = False) -> MergeOption:
    """A ``--name/--no-name`` boolean."""
    flag = name.replace("_", "-")
    return MergeOption(name, (f"--{flag}/--no-{flag}",), bool, default, help, heading)


def _value(name: str, kind: type, help: str, heading: str) -> MergeOption:
    """A ``--name VALUE`` option, unset by default."""
    return MergeOption(name, (f"--{name.replace('_', '-')}",), kind, None, help, heading)


MERGE_OPTIONS: dict[str, MergeOption] = {
    option.name: option
    for option in (
        _switch("allow_crimes", "Allow mixing architectures", DANGEROUS),
        _value("transformers_cache", str, "Override storage path for downloaded models", STORAGE),
        _value("lora_merge_cache", str, "Path to store merged LORA models", STORAGE),
        _value("lora_merge_dtype", str, "Override dtype when applying LoRAs", MISCELLANEOUS),
        _switch("cuda", "Perform matrix arithmetic on GPU", PERFORMANCE),
        _value("device", str, "Perform matrix arithmetic on specified device", PERFORMANCE),
        _switch(
            "low_cpu_memory",
            "Store results and intermediate values on accelerator. Useful if VRAM > RAM",
            PERFORMANCE,
        ),
        _switch(
            "trust_remote_code", "Trust remote code from huggingface repos (danger)", DANGEROUS
        ),
        _value(
            "random_seed",
            int,
            "Seed for reproducible use of randomized merge methods",
            MISCELLANEOUS,
        ),
        _switch("lazy_unpickle", "Experimental lazy unpickler for lower memory usage", PERFORMANCE),
        _switch(
            "write_model_card", "Output README.md containing details of the merge", OUTPUT, True
        ),
        MergeOption(
            "verbosity",
            ("-v",),
            int,
            0,
            "Verbose logging (repeat for more verbosity)",
            MISCELLANEOUS,
            show_default=False,
            count=True,
        ),
        _switch("quiet", "Suppress progress bars and other non-essential output", MISCELLANEOUS),
        _switch("read_to_gpu", "Read model weights directly to accelerator", PERFORMANCE),
        MergeOption(
            "num_threads",
            ("--num-threads", "-j"),
            int,
            None,
            "Number of threads to use for parallel CPU operations",
            PERFORMANCE,
        ),
    )
}
"""The ``MergeOptions`` fields our commands take, in mergekit's field order (the order of help)."""


def to_merge_options(values: Mapping[str, Any]) -> MergeOptions:
    """mergekit's ``MergeOptions`` from parsed option values (imports mergekit: run time only)."""
    from mergekit.options import MergeOptions

    return MergeOptions(**values)


def mergekit_options(*names: str) -> Callable[[Callable], Callable]:
    """Add the named :data:`MERGE_OPTIONS` to a click command (in mergekit's order); the function
    receives ``merge_options`` (mergekit's ``MergeOptions``) in their place, where the fields not
    named keep mergekit's defaults."""
    unknown = set(names) - MERGE_OPTIONS.keys()
    if unknown:
        raise ValueError(f"not declared in MERGE_OPTIONS: {', '.join(sorted(unknown))}")
    chosen = [option for option in MERGE_OPTIONS.values() if option.name in names]

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {option.name: kwargs.pop(option.name) for option in chosen}
            return function(*args, merge_options=to_merge_options(values), **kwargs)

        for option in reversed(chosen):
            run = option.click_option()(run)
        return run

    return decorate


class GroupedHelp(click.Command):
    """Help that lists the command's own parameters under "Script Options", then each of
    mergekit's headings in the order its first option appears, as mergekit's ``PrettyPrintHelp``
    does: by parameter name (an own option named like one of :data:`MERGE_OPTIONS`, such as
    ``demo-models --random-seed``, goes under its heading) and without a ``--help`` line."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {SCRIPT_OPTIONS: []}
        for param in self.params:
            option = MERGE_OPTIONS.get(param.name or "")
            records = sections.setdefault(option.heading if option else SCRIPT_OPTIONS, [])
            record = param.get_help_record(ctx)
            if record is not None:
                records.append(record)
        for heading, records in sections.items():
            if records:
                with formatter.section(heading):
                    formatter.write_dl(records)
