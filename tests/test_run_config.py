"""The trainer's typed run configuration (issue 32 item 2): every flag is one field of one section, the command line
is parsed once into a `RunConfig` (no Namespace below it), and --help states the defaults that are used."""

import re

import pytest

from svdiff_trainer.args import NAMED_BASE_DEFAULTS, build_parser, parse_args
from svdiff_trainer.config import SECTION_TYPES, RunConfig
from svdiff_trainer.tiny import tiny_pipeline_path


def _flags():
    return [a.dest for a in build_parser()._actions if a.dest != "help"]


def test_every_flag_is_one_field_of_one_section_and_the_record_keeps_every_flag():
    config = RunConfig.from_flags(vars(build_parser().parse_args([])))
    flat = config.flat()
    # run.json records what vars(args) recorded before the sections: every flag and the three derived values
    assert set(flat) == set(_flags()) | {"embedded_model", "embedded_kind", "subjects"}
    for name in _flags():
        assert config.get(name) == flat[name]
    with pytest.raises(KeyError, match="'nope' is no flag"):
        RunConfig.from_flags({"nope": 1})


def test_parse_args_gives_a_run_config_in_sections(monkeypatch):
    monkeypatch.setenv("SVDIFF_TOOLS_EMBEDDED", "tiny")
    config = parse_args(["--method", "svft", "--svft_offset", "3", "--learning_rate", "2e-3", "--seed", "5"])
    assert type(config) is RunConfig
    assert {type(getattr(config, name)) for name in SECTION_TYPES} == set(SECTION_TYPES.values())
    assert (config.method.method, config.method.options["svft_offset"]) == ("svft", 3)
    assert (config.optim.learning_rate, config.optim.seed, config.model.embedded_kind) == (2e-3, 5, "tiny")


def _help_of(flag: str) -> str:
    """The help paragraph of ``--flag``, on one line."""
    text = build_parser().format_help()
    block = re.split(rf"\n  --{flag}[ ,]", text, maxsplit=1)[1].split("\n  --", 1)[0]
    return " ".join(block.split())


def _help_default(flag: str) -> str:
    return re.search(r"default: (.*?)(;|$)", _help_of(flag)).group(1)


@pytest.mark.parametrize("name", sorted(NAMED_BASE_DEFAULTS))
def test_help_states_the_default_a_named_base_gets(name, monkeypatch, tmp_path):
    """--help's 'default: X' for a flag filled later is the value a run on a named base gets when it is left out."""
    monkeypatch.setenv("SVDIFF_TOOLS_EMBEDDED", "tiny")
    stated = _help_default(name)
    config = parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline_path("sd15")), "--output_dir",
                         str(tmp_path / "out")])
    assert stated == repr(config.get(name))


@pytest.mark.parametrize("name", ["resolution", "max_train_steps", "num_inference_steps"])
def test_help_states_the_default_the_embedded_base_gets(name, monkeypatch):
    monkeypatch.setenv("SVDIFF_TOOLS_EMBEDDED", "tiny")
    stated = re.search(r"on the embedded tiny base: (\S+)", _help_of(name)).group(1)
    assert stated == repr(parse_args(["--method", "svfit"]).get(name))


def test_the_run_says_which_defaults_it_chose_and_the_recipe_it_applies(monkeypatch, tmp_path):
    """Issue 33: a new folder silently lost the main job's recipe. Now any folder gets it, and the run says every
    default it chose and where from, the subject as read from the prompt, prior preservation and how to turn it off,
    and the validation prompts."""
    import shutil

    from svdiff_trainer.args import recipe_lines
    from svdiff_trainer.presets import EXAMPLE_DATA

    monkeypatch.setenv("SVDIFF_TOOLS_EMBEDDED", "tiny")
    mine = shutil.copytree(EXAMPLE_DATA, tmp_path / "mine")
    config = parse_args(["--method", "svdiff", "--instance_data_dir", str(mine), "--instance_prompt",
                         "a photo of zwx toy", "--max_train_steps", "5"])
    first, subject, prior, prompts = recipe_lines(config)
    assert "--resolution 32 (the tiny preset)" in first and "--num_inference_steps 4 (the tiny preset)" in first
    assert "--learning_rate 0.001 (svdiff's default: SVDiff paper" in first
    assert "--max_train_steps" not in first and "--instance_prompt" not in first  # the user's flags are theirs
    assert subject == "subject: identifier 'zwx', class 'toy' (--identifier, --class_word change them)"
    assert "--class_prompt 'a photo of a toy' (the recipe" in first
    # the tiny base's recipe leaves prior preservation off (random weights), and says how to turn it on
    assert prior.startswith("prior preservation: off (--with_prior_preservation --class_prompt")
    assert prompts == "validation prompts: 'a photo of zwx toy'"
    on = parse_args(["--method", "svdiff", "--instance_data_dir", str(mine), "--instance_prompt", "a photo of zwx toy",
                     "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class")])
    assert on.data.class_prompt == "a photo of a toy" and on.data.num_class_images == 100
    assert recipe_lines(on)[2].startswith("prior preservation: on, 100 class images of 'a photo of a toy'")
    assert "--no-with_prior_preservation turns it off" in recipe_lines(on)[2]
    unread = parse_args(["--method", "svdiff", "--instance_data_dir", str(mine), "--instance_prompt", "zwx"])
    assert "pass --identifier and --class_word" in recipe_lines(unread)[1] and not unread.data.with_prior_preservation
