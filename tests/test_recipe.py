from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lm_pretrain.cli import app
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert load_recipe(path).name


def test_typo_names_path_and_close_match():
    with pytest.raises(LmpError) as exc:
        validate_recipe({"name": "x", "train": {"max_step": 10}})
    msg = str(exc.value)
    assert "train.max_step" in msg
    assert "did you mean 'max_steps'" in msg


@pytest.mark.parametrize(
    "raw, suggestion",
    [
        ({"eval": {"task": ["probe"]}}, "tasks"),
        ({"train": {"average": {"kynd": "ema"}}}, "kind"),
        ({"data": {"metadata": {"feld": "source"}}}, "field"),
    ],
)
def test_typo_inside_an_optional_section(raw, suggestion):
    with pytest.raises(LmpError) as exc:
        validate_recipe({"name": "x", **raw})
    assert f"did you mean '{suggestion}'" in str(exc.value)
    assert "allowed here: )" not in str(exc.value)


def test_top_level_typo():
    with pytest.raises(LmpError, match="did you mean 'model'"):
        validate_recipe({"name": "x", "modle": {}})


def test_wrong_type_names_value():
    with pytest.raises(LmpError) as exc:
        validate_recipe({"name": "x", "model": {"hidden_size": "big"}})
    assert "model.hidden_size" in str(exc.value)
    assert "'big'" in str(exc.value)


def test_out_of_range_and_bad_choice():
    with pytest.raises(LmpError, match="data.validation_fraction"):
        validate_recipe({"name": "x", "data": {"validation_fraction": 0.9}})
    with pytest.raises(LmpError) as exc:
        validate_recipe({"name": "x", "schedule": {"kind": "linear-ish"}})
    assert "schedule.kind" in str(exc.value) and "'wsd'" in str(exc.value)


def test_cross_field_rules():
    with pytest.raises(LmpError, match="divisible by num_heads"):
        validate_recipe({"name": "x", "model": {"hidden_size": 100, "num_heads": 3}})
    with pytest.raises(LmpError, match="set only one of.*add --set train.max_steps=null"):
        validate_recipe({"name": "x", "train": {"max_steps": 5, "max_tokens": 100}})
    with pytest.raises(LmpError, match="data.word_budget"):
        validate_recipe({"name": "x", "train": {"batch_size": 8}})
    with pytest.raises(LmpError, match="fsdp"):
        validate_recipe(
            {"name": "x", "train": {"max_steps": 5, "distributed": "fsdp", "average": {"kind": "ema"}}}
        )
    with pytest.raises(LmpError, match="exceeds 1"):
        validate_recipe({"name": "x", "hybrid": {"random_fraction": 0.6, "keep_fraction": 0.6}})
    with pytest.raises(LmpError, match="eval.data_dir"):
        validate_recipe({"name": "x", "eval": {"tasks": ["blimp"]}})
    with pytest.raises(LmpError, match=r"optim.betas: too few values \(got \[0.9\]\)"):
        validate_recipe({"name": "x", "optim": {"betas": [0.9]}})


@pytest.mark.parametrize("template", ["{src}: ", "URL: {value", "no field", "{value} {source}", "{}"])
def test_meco_template_needs_exactly_the_value_field(template):
    with pytest.raises(LmpError, match="data.metadata.template"):
        validate_recipe({"name": "x", "data": {"metadata": {"template": template}}})
    ok = validate_recipe({"name": "x", "data": {"metadata": {"template": "{{src}} {value}"}}})
    assert ok.data.metadata.resolved_template.format(value="v") == "{src} v"


def test_words_seen_defaults_to_ten_passes_of_the_budget():
    recipe = validate_recipe({"name": "x", "data": {"word_budget": 1000}, "train": {"batch_size": 8}})
    assert recipe.max_words_seen == 10_000
    recipe = validate_recipe({"name": "x", "data": {"word_budget": 1000}, "train": {"max_steps": 5}})
    assert recipe.max_words_seen is None


def test_extends_and_typed_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"name": "base", "model": {"hidden_size": 128, "num_layers": 2}})
    child = write(
        tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child", "model": {"num_layers": 3}}
    )
    recipe = load_recipe(child, ["optim.lr=1e-3", "train.max_steps=7", "tokenizer.path=null"])
    assert recipe.name == "child"
    assert recipe.model.hidden_size == 128  # inherited
    assert recipe.model.num_layers == 3  # overridden by the child
    assert recipe.optim.lr == pytest.approx(1e-3)
    assert recipe.train.max_steps == 7


def test_extends_cycle_and_missing(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml", "name": "b"})
    with pytest.raises(LmpError, match=r"in a cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(LmpError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path / "c.yaml", {"extends": "gone.yaml", "name": "c"})
    with pytest.raises(LmpError, match="c.yaml: extends 'gone.yaml'"):
        load_recipe(tmp_path / "c.yaml")
    run = tmp_path / "run"
    write(run / "recipe.yaml", {"name": "r"})
    with pytest.raises(LmpError, match="is a run folder"):
        load_recipe(run)


def test_yaml_pitfalls(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\ntrain:\n  max_steps: 5\ntrain:\n  batch_size: 4\n")
    with pytest.raises(LmpError, match="the key 'train' is given twice"):
        load_recipe(dup)
    path = write(tmp_path / "r.yaml", {"name": "r"})
    recipe = load_recipe(path, ["train.max_tokens=1e6", "train.max_steps=null", "optim.lr=3e-4"])
    assert recipe.train.max_tokens == 1_000_000 and recipe.optim.lr == pytest.approx(3e-4)
    for name in ("..", ".", "a/b", ".hidden"):
        with pytest.raises(LmpError, match="must be a folder name"):
            load_recipe(path, [f"name={name}"])


def test_bad_override_syntax(tmp_path):
    path = write(tmp_path / "r.yaml", {"name": "r"})
    with pytest.raises(LmpError, match="key.path=value"):
        load_recipe(path, ["train.max_steps"])


def test_cli_prints_error_without_traceback(tmp_path):
    path = write(tmp_path / "r.yaml", {"name": "r", "optim": {"lr": -1}})
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    assert "optim.lr" in result.output
    assert "Traceback" not in result.output


def test_cli_recipe_show_resolves(tmp_path):
    path = write(tmp_path / "r.yaml", {"name": "r"})
    result = CliRunner().invoke(app, ["recipe", "show", str(path), "--set", "model.num_layers=9"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["num_layers"] == 9
    assert shown["schedule"]["kind"] == "wsd"  # defaults are filled in


def test_cli_error_text_is_not_read_as_markup(tmp_path):
    path = write(tmp_path / "r.yaml", {"name": "r", "tracking": {"tensorboard": "[maybe]"}})
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    assert "'[maybe]'" in result.output


def test_a_yaml_mistake_is_one_line_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {max_steps: 3\nmodel: [1\n")
    with pytest.raises(LmpError, match=r"bad\.yaml:3:6 is not valid YAML: expected ',' or '\}'") as info:
        load_recipe(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(LmpError, match="is a folder; give a recipe file"):
        load_recipe(tmp_path)
