"""Our declaration of mergekit's merge options (``mergekit_safemerge.mergekit_options``) is
mergekit's own: same click options, same ``MergeOptions``, same grouped help. A change in
mergekit fails here."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from mergekit.options import OPTION_CATEGORIES, PrettyPrintHelp, add_merge_options

from mergekit_safemerge.cli import cli
from mergekit_safemerge.mergekit_options import MERGE_OPTIONS, GroupedHelp, mergekit_options

NAMES = tuple(MERGE_OPTIONS)


def _theirs(*names: str) -> click.Command:
    """A command with mergekit's ``add_merge_options``, kept to ``names``; returns the options."""

    @click.command()
    @add_merge_options
    def command(merge_options):
        return merge_options

    command.params = [p for p in command.params if p.name in names]
    return command


def _ours(*names: str) -> click.Command:
    @click.command()
    @mergekit_options(*names)
    def command(merge_options):
        return merge_options

    return command


def _described(param: click.Parameter, ctx: click.Context) -> dict:
    return {
        **param.to_info_dict(),
        "class": type(param),
        "show_default": getattr(param, "show_default", None),
        "help_record": param.get_help_record(ctx),
    }


def test_declaration_is_mergekits_options_in_mergekits_order():
    theirs, ours = _theirs(*NAMES), _ours(*NAMES)
    assert [p.name for p in theirs.params] == list(NAMES)
    assert [p.name for p in ours.params] == list(NAMES)
    ctx = click.Context(ours, info_name="command")
    for mine, mergekits in zip(ours.params, theirs.params, strict=True):
        assert _described(mine, ctx) == _described(mergekits, ctx), mine.name
    assert {name: option.heading for name, option in MERGE_OPTIONS.items()} == {
        name: OPTION_CATEGORIES[name] for name in NAMES
    }


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--cuda"],
        ["--device", "cuda:1", "-vv", "-j", "3", "--quiet"],
        ["--device", "auto", "--no-cuda", "--no-quiet", "--num-threads", "2"],
        ["--allow-crimes", "--trust-remote-code", "--lazy-unpickle", "--read-to-gpu",
         "--low-cpu-memory", "--no-write-model-card", "--random-seed", "7", "-v",
         "--transformers-cache", "/tmp/t", "--lora-merge-cache", "/tmp/c",
         "--lora-merge-dtype", "bfloat16"],
    ],
)  # fmt: skip
def test_parsed_values_build_mergekits_merge_options(args):
    theirs = _theirs(*NAMES).main(args, standalone_mode=False)
    ours = _ours(*NAMES).main(args, standalone_mode=False)
    assert type(ours) is type(theirs)
    assert ours == theirs


def test_a_subset_leaves_the_other_fields_at_mergekits_defaults():
    names = ("cuda", "verbosity", "quiet")  # mergekit's field order
    theirs = _theirs(*names).main(["--cuda", "-v"], standalone_mode=False)
    ours = _ours(*names).main(["--cuda", "-v"], standalone_mode=False)
    assert ours == theirs
    assert [p.name for p in _ours(*reversed(names)).params] == list(names)
    with pytest.raises(ValueError, match="out_shard_size"):
        mergekit_options("cuda", "out_shard_size")


GROUPED = [name for name, command in cli.commands.items() if isinstance(command, GroupedHelp)]


def test_every_command_with_merge_options_groups_its_help():
    assert set(GROUPED) == {"scan", "adapter", "tune", "eval", "demo-models"}


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_help_is_mergekits_pretty_print_help(name):
    command = cli.commands[name]
    as_mergekit = PrettyPrintHelp(
        name, context_settings=command.context_settings, params=command.params, help=command.help
    )
    helps = []
    for variant in (command, as_mergekit):
        root = click.Group("safemerge", commands={name: variant})
        result = CliRunner().invoke(root, [name, "--help"], prog_name="safemerge",
                                    terminal_width=100)  # fmt: skip
        assert result.exit_code == 0, result.output
        helps.append(result.output)
    assert helps[0] == helps[1]
    assert "Script Options:" in helps[0]
