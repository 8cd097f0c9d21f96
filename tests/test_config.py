import dataclasses
import tomllib

import pytest

from flexslim.errors import BadInput
from flexslim.recipe.schema import (
    SECTIONS,
    ModelConfig,
    Recipe,
    StageSpec,
    TrainConfig,
    load_recipe,
    recipe_dir,
    recipe_from_dict,
    recipe_to_toml,
    shipped_recipes,
    stage_widths,
)


def test_quickstart_is_shipped():
    assert "quickstart" in shipped_recipes()
    assert (recipe_dir() / "quickstart.toml").is_file()


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.model.stages, "a recipe needs at least one stage"
    assert all(isinstance(s, StageSpec) and s.width >= 1 for s in recipe.model.stages)
    assert len({s.name for s in recipe.model.stages}) == len(recipe.model.stages), "stage names must be unique"
    # loading by path gives the same recipe as loading by name
    assert load_recipe(str(recipe_dir() / f"{name}.toml")) == recipe


@pytest.mark.parametrize("name", shipped_recipes())
def test_loaded_recipe_reflects_the_file(name):
    """Oracle: every value written in the TOML file is in the Recipe; every key left out has the default."""
    raw = tomllib.loads((recipe_dir() / f"{name}.toml").read_text())
    recipe = load_recipe(name)
    for section in SECTIONS:
        table, defaults = raw.get(section, {}), getattr(Recipe(), section)
        for f in dataclasses.fields(defaults):
            got = getattr(getattr(recipe, section), f.name)
            if f.name not in table:
                assert got == getattr(defaults, f.name), (section, f.name)
            elif isinstance(table[f.name], list):  # TOML arrays become tuples (of StageSpec for tables)
                want = tuple(StageSpec(**v) if isinstance(v, dict) else v for v in table[f.name])
                assert got == want and isinstance(got, tuple), (section, f.name)
            else:
                assert got == table[f.name], (section, f.name)


def test_quickstart_data_and_widths():
    r = load_recipe("quickstart")
    assert r.data.dataset == "quickstart" and r.data.flip is False  # a mirrored 3 is not a 3
    assert stage_widths(r.model) == {s.name: s.width for s in r.model.stages}
    assert isinstance(r.train.lr, float)


def test_paper_defaults():
    t = TrainConfig()
    assert (t.batch_size, t.lr, t.momentum, t.weight_decay, t.grad_clip) == (96, 0.025, 0.9, 3e-4, 5.0)


@pytest.mark.parametrize("name", [*shipped_recipes(), None])
def test_round_trip(tmp_path, name):
    """recipe -> recipe_to_toml -> file -> load_recipe gives the equal Recipe (None: all defaults)."""
    recipe = load_recipe(name) if name else Recipe()
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe))
    again = load_recipe(str(path))
    assert again == recipe
    assert recipe_to_toml(again) == recipe_to_toml(recipe)


def test_round_trip_with_overrides_and_odd_strings(tmp_path):
    recipe = load_recipe("quickstart", ["train.epochs=3", 'model.stages=[{ name = "a\\"b", width = 24 }]'])
    recipe = dataclasses.replace(recipe, name="odd-name_1.2")  # names are restricted: they name run directories
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(str(path)) == recipe
    path.write_text(recipe_to_toml(dataclasses.replace(recipe, name='we\\ird "name"')))
    with pytest.raises(BadInput, match="recipe name"):
        load_recipe(str(path))


def test_override_int_float_bool_string():
    r = load_recipe(
        "quickstart", ["train.epochs=3", "train.lr=0.1", "data.flip=true", "latency.provider=cpu", "search.sigma=4"]
    )
    assert r.train.epochs == 3 and type(r.train.epochs) is int
    assert r.train.lr == 0.1
    assert r.data.flip is True
    assert r.latency.provider == "cpu"  # not valid TOML: taken as a plain string
    assert r.search.sigma == 4.0 and type(r.search.sigma) is float  # an int where a float is expected is widened
    # untouched values keep the recipe's
    assert r.train.batch_size == 64 and r.data.image_size == 16


def test_override_later_wins():
    assert load_recipe("quickstart", ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


def test_override_list_of_stage_tables():
    r = load_recipe(
        "quickstart",
        [
            (
                'model.stages=[{ name = "s1", width = 8, blocks = 2, stride = 1 }, '
                '{ name = "s2", width = 24, stride = 2 }]'
            )
        ],
    )
    assert r.model.stages == (StageSpec("s1", 8, 2, 1), StageSpec("s2", 24, 1, 2))
    assert isinstance(r.model.stages, tuple)
    assert stage_widths(r.model) == {"s1": 8, "s2": 24}


def test_override_stage_table_with_bad_key_lists_stage_keys():
    with pytest.raises(BadInput) as e:
        load_recipe("quickstart", ['model.stages=[{ name = "s1", width = 8, depth = 2 }]'])
    msg = str(e.value)
    assert "depth" in msg and all(k in msg for k in ("name", "width", "blocks", "stride"))


@pytest.mark.parametrize("item", ["nosuch.key=1", "model=3", "train.epochs", "a.b.c=1", ".x=1"])
def test_override_unknown_section_or_malformed_lists_sections(item):
    with pytest.raises(BadInput) as e:
        load_recipe("quickstart", [item])
    msg = str(e.value)
    assert all(s in msg for s in SECTIONS), msg


def test_override_unknown_key_lists_valid_keys():
    with pytest.raises(BadInput) as e:
        load_recipe("quickstart", ["train.nosuch=1"])
    msg = str(e.value)
    assert "nosuch" in msg
    for f in dataclasses.fields(TrainConfig):
        assert f.name in msg


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.epochs=abc", "int"),
        ("train.epochs=1.5", "int"),
        ("train.epochs=true", "int"),  # a bool is not an int here
        ("train.lr=fast", "float"),
        ("data.flip=1", "bool"),
        ("data.dataset=3", "str"),
        ("model.stages=3", "list"),
        ('model.stages=[{ name = "s", width = "wide" }]', "int"),
    ],
)
def test_wrong_type_is_bad_input(item, expected):
    with pytest.raises(BadInput) as e:
        load_recipe("quickstart", [item])
    assert expected in str(e.value)
    assert item.split("=")[0].split(".")[1] in str(e.value)  # names the key


def test_unknown_section_in_file_lists_sections(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[nosuch]\nx = 1\n")
    with pytest.raises(BadInput) as e:
        load_recipe(str(path))
    assert "nosuch" in str(e.value)
    assert all(s in str(e.value) for s in SECTIONS)


def test_unknown_key_in_file_lists_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[model]\nwidth_mult = 2\n")
    with pytest.raises(BadInput) as e:
        load_recipe(str(path))
    for f in dataclasses.fields(ModelConfig):
        assert f.name in str(e.value)


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(BadInput) as e:
        load_recipe("no-such-recipe")
    assert "no-such-recipe" in str(e.value)
    assert "quickstart" in str(e.value)


def test_missing_toml_path(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_recipe(str(tmp_path / "missing.toml"))


def test_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = \n")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_recipe(str(path))


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[train]\nepochs = 2\n")
    r = load_recipe(str(path))
    assert r.name == "mine" and r.train.epochs == 2
    assert r.model == ModelConfig()


def test_recipe_from_dict_rejects_non_table():
    with pytest.raises(BadInput):
        recipe_from_dict({"train": 3})


def test_recipes_are_frozen():
    r = load_recipe("quickstart")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.epochs = 1  # type: ignore[misc]
